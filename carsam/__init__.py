"""carsam: 4-bit post-training quantization of Segment Anything (CAR-SAM and baselines)."""

__version__ = "0.1.0"

"""carsam: 4-bit post-training quantization of Segment Anything (CAR-SAM and baselines).

`carsam.load_quantized(run_dir)` loads the quantized model a run saved (`carsam.export.saved`); it is imported
on first use, so `import carsam` stays free of torch.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "load_quantized":
        from carsam.export.saved import load_quantized

        return load_quantized
    raise AttributeError(f"module 'carsam' has no attribute '{name}'")

"""Speed of the exported graphs against torch (issue 16), side by side in one process, one thread each:
FP torch vs fake-quant torch vs the ONNX Q/DQ graph on onnxruntime's CPU provider, for the decoder (prompt
encoder + mask decoder, 7 boxes) and the image encoder, on the testbed at W4A4.

    python bench/onnx_speed.py [--repeats 30]

The quantized model is the shipped testbed with RTN W4A4 qparams calibrated on 4 synthetic images (speed does not
depend on the qparams' values). What runs where: torch's fake quantizer rounds and rescales in fp32; the ONNX
graph's QuantizeLinear/DequantizeLinear do the same in fp32 and its MatMuls run in fp32. Neither runs integer
arithmetic: both are emulations of W4A4, and the ratios say what the emulation costs, not what int4 kernels
would save. Times are medians over `--repeats` interleaved calls, this machine's CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch

from carsam.export.onnx_graph import DecoderGraph, EncoderGraph, export_onnx
from carsam.models.quantize import QuantConfig, calibrate_weights_, quantize_
from carsam.models.sam import build_model
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import set_quant_mode


def _quantized(sam_fp: torch.nn.Module, images: torch.Tensor, boxes: torch.Tensor) -> torch.nn.Module:
    sam = build_model("testbed")
    quantize_(sam, QuantConfig(w_observer="minmax"))
    calibrate_weights_(sam)
    set_quant_mode(sam, QuantMode.CALIBRATE)
    with torch.no_grad():
        for image in images:
            DecoderGraph(sam)(EncoderGraph(sam)(image[None]), boxes)
    set_quant_mode(sam, QuantMode.QUANTIZED)
    return sam.eval()


def _median_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()  # warm-up
    for _ in range(repeats):
        for name, call in calls.items():  # interleaved, so drift hits every variant alike
            start = time.perf_counter()
            call()
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fp = build_model("testbed").eval()
    size = fp.image_encoder.img_size
    images = torch.randn(4, 3, size, size)
    boxes = torch.tensor([[4.0 + 8 * i, 6.0 + 5 * i, 60.0 + 6 * i, 70.0 + 4 * i] for i in range(7)])
    sam = _quantized(fp, images, boxes)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(sam, tmp)
        encoder = ort.InferenceSession(str(Path(tmp, "encoder.onnx")), options, providers=["CPUExecutionProvider"])
        decoder = ort.InferenceSession(str(Path(tmp, "decoder.onnx")), options, providers=["CPUExecutionProvider"])
        image = images[:1]
        with torch.no_grad():
            embedding = EncoderGraph(fp)(image)
            feeds = {"image_embeddings": embedding.numpy(), "boxes": boxes.numpy()}
            results = {
                "decoder (7 boxes)": _median_ms({
                    "FP torch": lambda: DecoderGraph(fp)(embedding, boxes),
                    "fake-quant torch": lambda: DecoderGraph(sam)(embedding, boxes),
                    "ONNX Q/DQ, onnxruntime": lambda: decoder.run(None, feeds)}, args.repeats),
                "image encoder": _median_ms({
                    "FP torch": lambda: EncoderGraph(fp)(image),
                    "fake-quant torch": lambda: EncoderGraph(sam)(image),
                    "ONNX Q/DQ, onnxruntime": lambda: encoder.run(None, {"image": image.numpy()})}, args.repeats),
            }
    print("| part | variant | ms (this CPU, 1 thread) | vs FP torch |\n|---|---|---|---|")
    for part, times in results.items():
        for variant, ms in times.items():
            print(f"| {part} | {variant} | {ms:.2f} | {ms / times['FP torch']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""File sizes of a quantized model (issue 16): the FP checkpoint in fp32 and fp16, the saved fake-quant model
(`model.safetensors`) and the packed artifact (`carsam export`) at W4 and W8, for the shipped testbed and a
random-init vit_b (the real architecture; sizes do not depend on the weights' values).

    python bench/export_sizes.py [--models testbed vit_b]

The weights are quantized per output channel (carsam's default MSE search for the testbed, min-max for vit_b
to keep this quick; the sizes are the same). Activation quantizers stay uncalibrated (no data is run), so the
artifacts hold no activation qparams; a run's artifact adds 8 bytes per activation quantizer.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from carsam.export.packed import export_packed
from carsam.export.saved import MODEL_FILE, save_quantized
from carsam.models.quantize import QuantConfig, calibrate_weights_, quantize_
from carsam.models.sam import build_model, build_random_model
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import set_quant_mode


def _fp_model(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_type) if model_type.startswith("testbed") else build_random_model(model_type)


def _torch_size(state: dict[str, torch.Tensor], folder: Path, name: str) -> int:
    path = folder / name
    torch.save(state, path)
    return path.stat().st_size


def sizes(model_type: str, folder: Path) -> list[tuple[str, int]]:
    sam = _fp_model(model_type)
    fp32 = {k: v.float() for k, v in sam.state_dict().items()}
    rows = [("FP checkpoint, fp32 (torch.save)", _torch_size(fp32, folder, "fp32.pth")),
            ("FP checkpoint, fp16 (torch.save)", _torch_size({k: v.half() for k, v in fp32.items()}, folder,
                                                             "fp16.pth"))]
    for bits in (4, 8):
        quantized = _fp_model(model_type)
        quant = QuantConfig(w_bits=bits, w_observer="mse" if model_type.startswith("testbed") else "minmax")
        quantize_(quantized, quant)
        calibrate_weights_(quantized)
        set_quant_mode(quantized, QuantMode.QUANTIZED)
        run_dir = folder / f"w{bits}"
        run_dir.mkdir()
        save_quantized(quantized, run_dir, {"type": model_type, "checkpoint": "", "sha256": ""}, quant, {})
        if bits == 4:
            rows.append(("saved fake-quant model (model.safetensors, fp32)", (run_dir / MODEL_FILE).stat().st_size))
        written = export_packed(quantized, run_dir / "packed.safetensors", model_type)
        rows.append((f"packed artifact, W{bits} codes + fp16 FP parts", written["bytes"]))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["testbed", "vit_b"])
    args = parser.parse_args()
    print("| model | file | MB | vs fp16 |\n|---|---|---|---|")
    for model_type in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            rows = sizes(model_type, Path(tmp))
        fp16 = rows[1][1]
        for label, size in rows:
            print(f"| {model_type} | {label} | {size / 1e6:.2f} | {size / fp16:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

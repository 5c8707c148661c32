"""A real low-bit artifact: the quantized weights as packed integer codes (`export_packed`), and their
dequantization (`dequantize_packed`), which gives the fake-quant weights bit for bit.

Layout of the safetensors file (`model_w<bits>.safetensors` by default):

- for each weight layer whose weight quantizer is a calibrated uniform quantizer, under the layer's
  state-dict name `<layer>.weight`:
  - `<layer>.weight.codes`: the integer codes `c = clamp(round(w / s) + z, qmin, qmax)`, stored as `c - qmin`
    (unsigned, in `[0, 2^b - 1]`), flattened in C order; two 4-bit codes per uint8 byte (the first code in the
    low nibble, an odd count padded with a zero nibble) at 4 bits or fewer (2-4 bits: one code per nibble),
    one code per uint8 at 5-8 bits, int32 above;
  - `<layer>.weight.scale` (fp32) and `<layer>.weight.zero_point` (int32), per output channel (`(out,)`, axis 0)
    or per tensor (`()`);
  - the weight is `w = (c - z) * s`, computed in fp32 (`c = code + qmin`): the fake quantizer's arithmetic, so
    the dequantized weight equals the evaluated fake-quant weight bit for bit;
- each activation quantizer's qparams under its module path: `<path>.scale` (fp32) and, for uniform ones,
  `<path>.zero_point` (int32); AGQ's log quantizers' bits and tau (levels `s * 2^(-k / tau)`) are in the header;
- every other state entry (LayerNorms, biases, embeddings, the FP modules) as fp16.

The header's `__metadata__["carsam"]` (JSON) gives the format, the model type, the zero-point convention and
per quantized tensor its bits, qmin, qmax, axis, shape, packing and module path, and per activation quantizer
its kind, bits and (log) tau. Activations stay fake-quantized at run time (no integer kernel here runs A4).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from carsam.files import replace_atomic
from carsam.quant.logquant import LogQuantizer
from carsam.quant.modules import quantized_weight_modules
from carsam.quant.primitives import broadcast_to_axis
from carsam.quant.quantizers import QuantMode, UniformQuantizer, iter_quantizers

PACKED_FORMAT = 1
ZERO_POINT_CONVENTION = "w = (code - zero_point) * scale, code = stored + qmin"


class PackError(ValueError):
    """The model cannot be packed (a weight quantizer not calibrated or not in QUANTIZED mode)."""


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes (any shape, values in `[0, 2^bits - 1]`) -> a flat storage tensor: uint8 with two codes per
    byte (low nibble first; an odd count padded with 0) for bits <= 4, uint8 one per byte for 5-8, int32 above."""
    flat = codes.reshape(-1).to(torch.int32)
    if bits <= 4:
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        return (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8)
    return flat.to(torch.uint8) if bits <= 8 else flat


def unpack_codes(stored: Tensor, bits: int, numel: int) -> Tensor:
    """The inverse of `pack_codes`: the first `numel` unsigned codes, int32, flat."""
    if bits <= 4:
        as_int = stored.to(torch.int32)
        return torch.stack([as_int & 0xF, as_int >> 4], dim=1).reshape(-1)[:numel]
    return stored.to(torch.int32)[:numel]


def weight_codes(weight: Tensor, quantizer: UniformQuantizer) -> Tensor:
    """The integer codes `clamp(round(w / s) + z, qmin, qmax)` of `weight` (its shape, int32), computed as the fake
    quantizer does (`w * (1 / s)`)."""
    scale = broadcast_to_axis(quantizer.scale.detach(), weight.dim(), quantizer.ch_axis)
    zero_point = broadcast_to_axis(quantizer.zero_point.detach(), weight.dim(), quantizer.ch_axis)
    code = torch.clamp(torch.round(weight.detach() * scale.reciprocal()) + zero_point, quantizer.qmin, quantizer.qmax)
    return code.to(torch.int32)


def dequantize_codes(codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None) -> Tensor:
    """`(codes - zero_point) * scale` in fp32, qparams broadcast along `axis` (codes: the weight's shape)."""
    scale = broadcast_to_axis(scale.float(), codes.dim(), axis)
    zero_point = broadcast_to_axis(zero_point.float(), codes.dim(), axis)
    return (codes.float() - zero_point) * scale


def _activation_entries(sam: nn.Module, weight_quantizer_ids: set[int]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    described: dict[str, Any] = {}
    for path, quantizer in iter_quantizers(sam):
        if id(quantizer) in weight_quantizer_ids or not quantizer.is_calibrated:
            continue
        if not isinstance(quantizer, (LogQuantizer, UniformQuantizer)):
            raise PackError(f"quantizer '{path}' ({type(quantizer).__name__}) has no packed form: finalize it first")
        tensors[f"{path}.scale"] = quantizer.scale.detach().float().cpu().contiguous()
        if isinstance(quantizer, LogQuantizer):
            described[path] = {"kind": "log", "bits": quantizer.bits, "tau": quantizer.tau}
        else:
            tensors[f"{path}.zero_point"] = quantizer.zero_point.detach().to(torch.int32).cpu().contiguous()
            described[path] = {"kind": "uniform", "bits": quantizer.bits, "qmin": quantizer.qmin,
                               "qmax": quantizer.qmax, "axis": quantizer.ch_axis}
    return tensors, described


def packed_tensors(sam: nn.Module, model_type: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, header) of the packed artifact of a quantized `sam` (module docstring). Raises `PackError` when a
    weight layer's quantizer is not a calibrated uniform quantizer in QUANTIZED mode."""
    tensors: dict[str, Tensor] = {}
    weights: dict[str, Any] = {}
    weight_quantizer_ids = set()
    for path, layer in quantized_weight_modules(sam):
        quantizer = layer.weight_quantizer
        if not isinstance(quantizer, UniformQuantizer):
            continue  # nn.Identity: an FP weight, stored with the FP parts
        if quantizer.mode is not QuantMode.QUANTIZED or not quantizer.is_calibrated:
            raise PackError(f"weight quantizer of '{path}' is {quantizer.mode.value}"
                            f"{'' if quantizer.is_calibrated else ', uncalibrated'}: only an evaluated quantized "
                            "model can be packed")
        weight_quantizer_ids.add(id(quantizer))
        codes = weight_codes(layer.weight, quantizer)
        name = f"{path}.weight"
        tensors[f"{name}.codes"] = pack_codes(codes - quantizer.qmin, quantizer.bits).cpu().contiguous()
        tensors[f"{name}.scale"] = quantizer.scale.detach().float().cpu().contiguous()
        tensors[f"{name}.zero_point"] = quantizer.zero_point.detach().to(torch.int32).cpu().contiguous()
        weights[name] = {"bits": quantizer.bits, "qmin": quantizer.qmin, "qmax": quantizer.qmax,
                         "axis": quantizer.ch_axis, "shape": list(layer.weight.shape), "module": path,
                         "packing": "two_per_uint8_low_first" if quantizer.bits <= 4 else
                         "one_per_uint8" if quantizer.bits <= 8 else "int32"}
    activation_tensors, activations = _activation_entries(sam, weight_quantizer_ids)
    quantizer_paths = {path for path, _ in iter_quantizers(sam)}
    fp_parts = {name: value.detach().half().cpu().contiguous() if value.is_floating_point() else value.cpu()
                for name, value in sam.state_dict().items()
                if name not in weights and isinstance(value, Tensor) and name.rsplit(".", 1)[0] not in quantizer_paths}
    tensors.update(fp_parts)
    tensors.update(activation_tensors)
    header = {"format": PACKED_FORMAT, "model_type": model_type, "zero_point_convention": ZERO_POINT_CONVENTION,
              "fp_dtype": "float16", "fp_entries": len(fp_parts), "weights": weights, "activations": activations}
    return tensors, header


def export_packed(sam: nn.Module, path: str | Path, model_type: str) -> dict[str, Any]:
    """Write the packed artifact of a quantized `sam` to `path` (atomically). Returns its size in bytes and
    counts: quantized weights, their bits, activation quantizers, FP entries."""
    tensors, header = packed_tensors(sam, model_type)
    payload = save(tensors, metadata={"carsam": json.dumps(header)})
    replace_atomic(path, lambda tmp: tmp.write_bytes(payload))
    bits = sorted({w["bits"] for w in header["weights"].values()})
    return {"file": str(path), "bytes": Path(path).stat().st_size, "weights": len(header["weights"]),
            "weight_bits": bits, "activations": len(header["activations"]), "fp_entries": header["fp_entries"]}


def read_packed_header(path: str | Path) -> dict[str, Any]:
    """The `carsam` header of a packed artifact."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "carsam" not in metadata:
        raise PackError(f"{path} has no carsam header: not a carsam packed artifact")
    header: dict[str, Any] = json.loads(metadata["carsam"])
    return header


def dequantize_packed(path: str | Path) -> dict[str, Tensor]:
    """The fp32 weights of the packed artifact at `path`, by state-dict name (`<layer>.weight`): the fake-quant
    weights the model was evaluated with, bit for bit."""
    header = read_packed_header(path)
    weights: Mapping[str, Mapping[str, Any]] = header["weights"]
    out = {}
    with safe_open(str(path), framework="pt") as handle:
        for name, entry in weights.items():
            shape = tuple(entry["shape"])
            codes = unpack_codes(handle.get_tensor(f"{name}.codes"), entry["bits"], math.prod(shape)) + entry["qmin"]
            out[name] = dequantize_codes(codes.reshape(shape), handle.get_tensor(f"{name}.scale"),
                                         handle.get_tensor(f"{name}.zero_point"), entry["axis"])
    return out


__all__ = ["PackError", "dequantize_packed", "export_packed", "pack_codes", "packed_tensors", "read_packed_header",
           "unpack_codes", "weight_codes"]

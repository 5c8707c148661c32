"""A runnable low-bit graph: the quantized model as ONNX (opset 21) with explicit Q/DQ nodes (`export_onnx`).

Two graphs, as segment_anything's own export splits SAM:

- `decoder.onnx`: prompt encoder + mask decoder. Inputs `image_embeddings` `(1, C, h, w)` and `boxes` `(N, 4)`
  (xyxy in the model's input frame, N dynamic); outputs `masks` `(N, 1, 4h, 4w)` (low-res logits) and `iou`
  `(N, 1)`, single-mask output;
- `encoder.onnx`: the image encoder. Input `image` `(1, 3, S, S)` (normalized and padded, `Sam.preprocess`);
  output `image_embeddings`.

How it is built. The model is traced by torch's TorchScript exporter (at opset 20, its highest) with every
quantizer replaced by a marker op (`carsam::FakeQuant`, attribute `path`); the markers are then lowered with the
`onnx` package, because the exporter's own fake-quant symbolics accept 8-bit ranges only, and the graph is raised
to opset 21 (whose changes to the ops the tracer emits only add types, int4 among them):

- a weight quantizer (its input an initializer): the weight becomes its integer codes as an INT4/UINT4
  initializer (INT8/UINT8 at 5-8 bits, INT16/UINT16 above) and the marker a `DequantizeLinear` (per output
  channel, `axis=0`);
- an activation or MatMul-operand quantizer: `QuantizeLinear` -> `DequantizeLinear` per tensor, with a float
  `Clip` to the grid first when the grid is narrower than the integer type (e.g. 6 bits in UINT8);
- AGQ's log quantizer: explicit ops, `code = clip(round(-tau * ln(p / s) / ln 2), 0, 2^b - 1)`, the value
  `s * 2^(-code / tau)`, and 0 where the unclipped code exceeds `2^b - 1` (`carsam.quant.logquant`).

The graph is an emulation of the quantized model: onnxruntime computes the DequantizeLinear outputs and the
MatMuls in fp32, so nothing here runs integer arithmetic. It differs from the fake-quant model in the last bits
(QuantizeLinear divides by the scale where the fake quantizer multiplies by its reciprocal; `ln / ln 2` is not
`log2`), which can move a value that sits on a rounding boundary by one step.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from segment_anything.modeling import Sam
from torch import Tensor, nn

from carsam.export.packed import PackError, weight_codes
from carsam.quant.logquant import LogQuantizer
from carsam.quant.quantizers import QuantizerBase, QuantMode, UniformQuantizer, iter_quantizers

OPSET = 21  # int4 QuantizeLinear / DequantizeLinear
TRACE_OPSET = 20  # the TorchScript exporter's highest; opset 21 changed no op it emits but for added types
MARKER_DOMAIN = "carsam"
MARKER_OP = "FakeQuant"


class _Marker(torch.autograd.Function):
    """Runs the quantizer; exports as `carsam::FakeQuant(x)` with the quantizer's path as attribute."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, point: _ExportPoint) -> Tensor:  # noqa: ARG004 - autograd signature
        return point.quantizer(x)

    @staticmethod
    def symbolic(g: Any, x: Any, point: _ExportPoint) -> Any:
        out = g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, path_s=point.path)
        out.setType(x.type())  # the input's shape and type: a convolution needs its kernel's shape
        return out


class _ExportPoint(nn.Module):
    """Stands in for a quantizer during tracing; holds it outside the module tree (no state of its own)."""

    quantizer: QuantizerBase

    def __init__(self, quantizer: QuantizerBase, path: str) -> None:
        super().__init__()
        self.__dict__["quantizer"] = quantizer
        self.path = path

    def forward(self, x: Tensor) -> Tensor:
        return _Marker.apply(x, self)


def _marked_copy(sam: Sam) -> tuple[Sam, dict[str, QuantizerBase]]:
    """A copy of `sam` whose quantizers are export points, and the quantizers by path. Raises `PackError` if a
    quantizer is not in QUANTIZED mode."""
    marked = copy.deepcopy(sam).eval().requires_grad_(False)
    quantizers = dict(iter_quantizers(marked))
    for path, quantizer in quantizers.items():
        if quantizer.mode is not QuantMode.QUANTIZED:
            raise PackError(f"quantizer '{path}' is {quantizer.mode.value}: only an evaluated quantized model exports")
        parent, _, name = path.rpartition(".")
        setattr(marked.get_submodule(parent), name, _ExportPoint(quantizer, path))
    return marked, quantizers


class DecoderGraph(nn.Module):
    """Prompt encoder + mask decoder on box prompts: `(image_embeddings (1, C, h, w), boxes (N, 4))` ->
    `(masks (N, 1, 4h, 4w), iou (N, 1))`, single-mask output."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image_embeddings: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        masks, iou = self.sam.mask_decoder(image_embeddings=image_embeddings,
                                           image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                           multimask_output=False)
        return masks, iou


class EncoderGraph(nn.Module):
    """The image encoder: `image (1, 3, S, S)` (preprocessed) -> `image_embeddings (1, C, h, w)`."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image: Tensor) -> Tensor:
        out: Tensor = self.sam.image_encoder(image)
        return out


def _integer_type(bits: int, signed: bool) -> tuple[int, int, int]:
    """(ONNX element type, its min, its max) of the narrowest Q/DQ integer type holding a `bits`-bit grid."""
    width = 4 if bits <= 4 else 8 if bits <= 8 else 16
    types = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4, (8, True): TensorProto.INT8,
             (8, False): TensorProto.UINT8, (16, True): TensorProto.INT16, (16, False): TensorProto.UINT16}
    low, high = (-(2 ** (width - 1)), 2 ** (width - 1) - 1) if signed else (0, 2**width - 1)
    return types[(width, signed)], low, high


def _integer_tensor(name: str, values: np.ndarray, elem_type: int) -> TensorProto:
    return helper.make_tensor(name, elem_type, list(values.shape), values.astype(np.int64).reshape(-1).tolist())


def _float(name: str, value: np.ndarray | float) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


class _Lowering:
    """Rewrites the markers of one traced graph into Q/DQ nodes and explicit ops (module docstring)."""

    def __init__(self, model: onnx.ModelProto, quantizers: Mapping[str, QuantizerBase]) -> None:
        self.model, self.quantizers = model, quantizers
        self.initializers = {init.name: init for init in model.graph.initializer}
        self.new_initializers: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []

    def run(self) -> onnx.ModelProto:
        graph = self.model.graph
        for node in graph.node:
            if node.domain == MARKER_DOMAIN and node.op_type == MARKER_OP:
                path = next(a.s.decode() for a in node.attribute if a.name == "path")
                self._lower(path, node.input[0], node.output[0])
            else:
                self.nodes.append(node)
        used = {name for node in self.nodes for name in node.input}
        kept = [init for init in graph.initializer if init.name in used]
        del graph.node[:], graph.initializer[:]
        graph.node.extend(self.nodes)
        graph.initializer.extend(kept + self.new_initializers)
        opsets = [o for o in self.model.opset_import if o.domain not in ("", MARKER_DOMAIN)]
        del self.model.opset_import[:]
        self.model.opset_import.extend([helper.make_opsetid("", OPSET), *opsets])
        return self.model

    def _add(self, *inits: TensorProto) -> None:
        self.new_initializers.extend(inits)

    def _lower(self, path: str, source: str, output: str) -> None:
        quantizer = self.quantizers[path]
        if isinstance(quantizer, LogQuantizer):
            self._log(path, quantizer, source, output)
        elif isinstance(quantizer, UniformQuantizer):
            if source in self.initializers:
                self._weight(path, quantizer, source, output)
            else:
                self._activation(path, quantizer, source, output)
        else:
            raise PackError(f"quantizer '{path}' ({type(quantizer).__name__}) has no ONNX form")

    def _qparams(self, path: str, quantizer: UniformQuantizer) -> tuple[str, str, int, int, int]:
        elem_type, low, high = _integer_type(quantizer.bits, quantizer.qmin < 0)
        scale = quantizer.scale.detach().float().cpu().numpy()
        zero_point = quantizer.zero_point.detach().cpu().numpy()
        self._add(_float(f"{path}.scale", scale), _integer_tensor(f"{path}.zero_point", zero_point, elem_type))
        return f"{path}.scale", f"{path}.zero_point", elem_type, low, high

    def _weight(self, path: str, quantizer: UniformQuantizer, source: str, output: str) -> None:
        weight = torch.from_numpy(numpy_helper.to_array(self.initializers[source]).copy())
        scale, zero_point, elem_type, _, _ = self._qparams(path, quantizer)
        codes = weight_codes(weight, quantizer).numpy()
        self._add(_integer_tensor(f"{path}.codes", codes, elem_type))
        node = helper.make_node("DequantizeLinear", [f"{path}.codes", scale, zero_point], [output], name=f"{path}/dq")
        if quantizer.ch_axis is not None:
            node.attribute.append(helper.make_attribute("axis", quantizer.ch_axis))
        self.nodes.append(node)

    def _activation(self, path: str, quantizer: UniformQuantizer, source: str, output: str) -> None:
        if quantizer.ch_axis is not None:
            raise PackError(f"activation quantizer '{path}' is per channel: carsam exports per-tensor activations")
        scale, zero_point, _, low, high = self._qparams(path, quantizer)
        value = source
        if (quantizer.qmin, quantizer.qmax) != (low, high):  # the grid is narrower than the integer type
            s, z = float(quantizer.scale), float(quantizer.zero_point)
            self._add(_float(f"{path}.clip_low", (quantizer.qmin - z) * s), _float(f"{path}.clip_high",
                                                                                   (quantizer.qmax - z) * s))
            value = f"{path}/clipped"
            self.nodes.append(helper.make_node("Clip", [source, f"{path}.clip_low", f"{path}.clip_high"], [value],
                                               name=f"{path}/clip"))
        self.nodes += [helper.make_node("QuantizeLinear", [value, scale, zero_point], [f"{path}/q"], name=f"{path}/q"),
                       helper.make_node("DequantizeLinear", [f"{path}/q", scale, zero_point], [output],
                                        name=f"{path}/dq")]

    def _log(self, path: str, quantizer: LogQuantizer, source: str, output: str) -> None:
        levels = 2**quantizer.bits
        self._add(_float(f"{path}.scale", quantizer.scale.detach().float().cpu().numpy()),
                  _float(f"{path}.neg_tau_per_ln2", -quantizer.tau / math.log(2.0)),
                  _float(f"{path}.zero", 0.0), _float(f"{path}.last_code", levels - 1),
                  _float(f"{path}.neg_inv_tau", -1.0 / quantizer.tau), _float(f"{path}.two", 2.0))
        p = f"{path}/"
        self.nodes += [
            helper.make_node("Div", [source, f"{path}.scale"], [p + "ratio"]),
            helper.make_node("Log", [p + "ratio"], [p + "ln"]),
            helper.make_node("Mul", [p + "ln", f"{path}.neg_tau_per_ln2"], [p + "scaled"]),
            helper.make_node("Round", [p + "scaled"], [p + "raw"]),
            helper.make_node("Clip", [p + "raw", f"{path}.zero", f"{path}.last_code"], [p + "code"]),
            helper.make_node("Greater", [p + "raw", f"{path}.last_code"], [p + "below"]),
            helper.make_node("Mul", [p + "code", f"{path}.neg_inv_tau"], [p + "exponent"]),
            helper.make_node("Pow", [f"{path}.two", p + "exponent"], [p + "power"]),
            helper.make_node("Mul", [p + "power", f"{path}.scale"], [p + "value"]),
            helper.make_node("Where", [p + "below", f"{path}.zero", p + "value"], [output]),
        ]


def _trace(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
           dynamic: dict[str, dict[int, str]]) -> onnx.ModelProto:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-dependent Python branches, fixed per shape
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter; it still lowers custom ops
        torch.onnx.export(module, args, str(path), opset_version=TRACE_OPSET, dynamo=False, input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic, custom_opsets={MARKER_DOMAIN: 1})
    return onnx.load(str(path))


def export_onnx(sam: Sam, folder: str | Path) -> dict[str, Any]:
    """Write `folder/decoder.onnx` and `folder/encoder.onnx` of a quantized `sam` (module docstring); returns their
    paths, sizes in bytes and Q/DQ node counts. Raises `PackError` if a quantizer is not QUANTIZED."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marked, quantizers = _marked_copy(sam)
    size = int(sam.image_encoder.img_size)
    grid_h, grid_w = (int(n) for n in sam.prompt_encoder.image_embedding_size)
    channels = int(sam.prompt_encoder.embed_dim)
    graphs = {
        "decoder": (DecoderGraph(marked), (torch.zeros(1, channels, grid_h, grid_w),
                                           torch.tensor([[0.0, 0.0, size / 2, size / 2]])),
                    ["image_embeddings", "boxes"], ["masks", "iou"], {"boxes": {0: "boxes"}, "masks": {0: "boxes"},
                                                                      "iou": {0: "boxes"}}),
        "encoder": (EncoderGraph(marked), (torch.zeros(1, 3, size, size),), ["image"], ["image_embeddings"], {}),
    }
    written: dict[str, Any] = {}
    for name, (module, args, inputs, outputs, dynamic) in graphs.items():
        path = folder / f"{name}.onnx"
        traced = _trace(module, args, path.with_suffix(".traced.onnx"), inputs, outputs, dynamic)
        lowered = _Lowering(traced, quantizers).run()
        onnx.checker.check_model(lowered)
        onnx.save(lowered, str(path))
        path.with_suffix(".traced.onnx").unlink()
        ops = [n.op_type for n in lowered.graph.node]
        written[name] = {"file": str(path), "bytes": path.stat().st_size,
                         "quantize_linear": ops.count("QuantizeLinear"),
                         "dequantize_linear": ops.count("DequantizeLinear")}
    return written


__all__ = ["DecoderGraph", "EncoderGraph", "OPSET", "export_onnx"]

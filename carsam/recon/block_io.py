"""Block I/O: the inputs and FP targets of one reconstruction unit over the calibration set.

The FP model (every quantizer in FP mode) runs over the calibration set the way the protocol runs it
(`SamBoxPredictor`: per image, embed, then decode all of the image's prompt boxes); forward hooks on the
unit's root module record every positional and keyword input and the output. One sample = one decoder call:
one image with its boxes, or with one chunk of at most `max_boxes` of them when it has more (decoder units:
batch B = those boxes; encoder units: batch 1), so a sample's size is bounded by a setting, not by the data. With
`inputs="quantized"` (QDrop/BRECQ), the inputs come from a second pass of the model with its
quantizers as the caller left them; the targets always come from the FP pass.

A span unit (`ReconUnit.steps`, see `carsam.recon.spans`) has no module of its own: a forward pre-hook
on the decoder transformer runs the step decomposition on the transformer's inputs (under no_grad, in
the pass's quantizer modes) and records the state at the span's start (kwargs queries, keys,
query_pe, key_pe) and the (queries, keys) at its end. The transformer's own forward then runs as usual.

Samples are kept on CPU (a list, since B varies per image), optionally in a narrower float dtype (`dtype`,
e.g. float16), and moved to a device one at a time (`BlockIO.sample(i, device)`), cast back to the dtype they
were computed in; `nbytes` is logged when the block I/O is built.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from carsam.data.coco import CocoBoxPrompts
from carsam.eval.inference import EmbeddingSource, box_predictor, protocol_pass
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import eval_no_grad, quant_modes_set
from carsam.recon.spans import span_states, transformer_inputs
from carsam.recon.units import ReconUnit, as_streams

logger = logging.getLogger(__name__)

INPUT_SOURCES = ("fp", "quantized")


def _map(obj: Any, fn: Any) -> Any:
    """Apply `fn` to every tensor in a tuple / list / dict (one level deep, as module inputs are)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _nbytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    return 0


@dataclasses.dataclass
class UnitSample:
    """One image's worth of unit I/O: `args`/`kwargs` to call the unit with, `targets` its FP outputs.

    Decoder tensors are `(B, N, E)` with B the image's boxes; encoder tensors `(1, H, W, C)`.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    targets: tuple[Tensor, ...]

    def to(self, device: torch.device | str, non_blocking: bool = False,
           float_dtype: torch.dtype | None = None) -> UnitSample:
        """A copy with every tensor on `device` (tensors already there are not copied), floating tensors cast to
        `float_dtype` when given."""
        def move(t: Tensor) -> Tensor:
            dtype = float_dtype if float_dtype is not None and t.is_floating_point() else t.dtype
            return t.to(device, dtype=dtype, non_blocking=non_blocking)

        return UnitSample(_map(self.args, move), _map(self.kwargs, move), _map(self.targets, move))

    @property
    def nbytes(self) -> int:
        """Bytes held by the sample's tensors."""
        return _nbytes(self.args) + _nbytes(self.kwargs) + _nbytes(self.targets)


class BlockIO:
    """The samples of one unit (a list of `UnitSample`, on CPU unless built otherwise)."""

    def __init__(self, unit: ReconUnit, samples: list[UnitSample], inputs: str = "fp",
                 compute_dtype: torch.dtype | None = None) -> None:
        if not samples:
            raise ValueError(f"the block I/O of unit '{unit.name}' is empty (no image reached the unit)")
        self.unit, self.samples, self.inputs = unit, samples, inputs
        self.compute_dtype = compute_dtype  # floats are cast to it when drawn (None: as stored)

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, index: int, device: torch.device | str | None = None) -> UnitSample:
        """Sample `index`, moved to `device` if given (pinned-memory copies are non-blocking on CUDA), its floats
        cast to `compute_dtype` when set."""
        sample = self.samples[index]
        if device is None and self.compute_dtype is None:
            return sample
        target = torch.device("cpu" if device is None else device)
        return sample.to(target, non_blocking=target.type == "cuda", float_dtype=self.compute_dtype)

    def order(self, num_steps: int, seed: int) -> list[int]:
        """`num_steps` sample indices: successive seeded random permutations of the samples."""
        gen = torch.Generator().manual_seed(seed)
        indices: list[int] = []
        while len(indices) < num_steps:
            indices.extend(torch.randperm(len(self), generator=gen).tolist())
        return indices[:num_steps]

    def stream(self, order: list[int], device: torch.device | str | None = None) -> Iterator[UnitSample]:
        """The samples in `order`, each moved to `device` when it is drawn."""
        return (self.sample(i, device) for i in order)

    @property
    def nbytes(self) -> int:
        """Bytes held by all captured tensors."""
        return sum(s.nbytes for s in self.samples)

    @property
    def num_prompts(self) -> int:
        """Total batch size over the samples (the boxes, for decoder units)."""
        return sum(s.targets[0].shape[0] for s in self.samples)

    @property
    def max_batch(self) -> int:
        """The largest batch of one sample (boxes, for decoder units): what one step holds."""
        return max(s.targets[0].shape[0] for s in self.samples)


class _Recorder:
    """Forward hooks on one module that record its inputs and/or outputs, call by call."""

    def __init__(self, module: nn.Module, inputs: bool, outputs: bool, dtype: torch.dtype | None) -> None:
        self.calls_in: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.calls_out: list[Any] = []
        self.dtype = dtype
        self.handles = []
        if inputs:
            self.handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
        if outputs:
            self.handles.append(module.register_forward_hook(self._post))

    def _store(self, t: Tensor) -> Tensor:
        t = t.detach()
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t.to("cpu", copy=True)

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls_in.append((_map(args, self._store), _map(kwargs, self._store)))

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.calls_out.append(_map(output, self._store))

    def pop(self) -> tuple[list[tuple[tuple[Any, ...], dict[str, Any]]], list[Any]]:
        calls = (self.calls_in, self.calls_out)
        self.calls_in, self.calls_out = [], []
        return calls

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _SpanRecorder(_Recorder):
    """A forward pre-hook on the decoder transformer that records a span's start state and/or end state."""

    def __init__(self, transformer: nn.Module, steps: tuple[str, ...], inputs: bool, outputs: bool,
                 dtype: torch.dtype | None) -> None:
        super().__init__(transformer, inputs=False, outputs=False, dtype=dtype)
        self.steps, self.want_inputs, self.want_outputs = steps, inputs, outputs
        self.handles.append(transformer.register_forward_pre_hook(self._span, with_kwargs=True))

    def _span(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with torch.no_grad():
            start, end = span_states(module, self.steps, *transformer_inputs(args, kwargs), end=self.want_outputs)
        if self.want_inputs:
            self.calls_in.append(((), _map(start._asdict(), self._store)))
        if end is not None:
            self.calls_out.append(_map((end.queries, end.keys), self._store))


def _recorder(sam: nn.Module, unit: ReconUnit, inputs: bool, outputs: bool, dtype: torch.dtype | None) -> _Recorder:
    """The hooks that record `unit`'s I/O: on its root module, or on the transformer for a span unit."""
    if unit.steps:
        return _SpanRecorder(sam.get_submodule(unit.path), unit.steps, inputs, outputs, dtype)
    return _Recorder(unit.module(sam), inputs, outputs, dtype)


def _capture_pass(sam: nn.Module, unit: ReconUnit, calib: CocoBoxPrompts, mode: QuantMode | None,
                  inputs: bool, outputs: bool, dtype: torch.dtype | None, source: EmbeddingSource | None,
                  max_boxes: int) -> list[tuple[Any, Any]]:
    """One protocol pass over `calib` with quantizers in `mode`, decoding at most `max_boxes` boxes per call:
    per call of the unit (one per image, or per box chunk of an image), (inputs, outputs)."""
    recorder = _recorder(sam, unit, inputs, outputs, dtype)
    per_call: list[tuple[Any, Any]] = []

    def collect(image_id: int) -> None:
        calls_in, calls_out = recorder.pop()
        per_call.extend(itertools.zip_longest(calls_in, calls_out))

    try:
        with eval_no_grad(sam), quant_modes_set(sam, mode):
            protocol_pass(box_predictor(sam, max_boxes, source=source), calib, encoder_only=unit.in_encoder,
                          after_image=collect)
    finally:
        recorder.remove()
    return per_call


def capture_block_io(sam: nn.Module, unit: ReconUnit, calib: CocoBoxPrompts, *, inputs: str = "fp",
                     dtype: torch.dtype | None = None, source: EmbeddingSource | None = None,
                     max_boxes: int = 64) -> BlockIO:
    """Capture `unit`'s inputs and FP targets over `calib` (see the module docstring).

    inputs: `fp` (FP model's inputs, one pass) or `quantized` (a second pass with the quantizers as they
    are). dtype: store floating tensors in this dtype on the CPU (None: as computed, fp32 for carsam's models);
    drawn samples are cast back to the model's parameter dtype. source: where the passes get image embeddings
    (the run's embedding store; None: encode). max_boxes: boxes per decoder call, hence per sample.
    The model's quantizer modes and train/eval flag are restored afterwards.
    """
    if inputs not in INPUT_SOURCES:
        raise ValueError(f"inputs must be one of {INPUT_SOURCES}, got '{inputs}'")
    fp_pass = _capture_pass(sam, unit, calib, QuantMode.FP, inputs == "fp", True, dtype, source, max_boxes)
    if inputs == "quantized":
        q_pass = _capture_pass(sam, unit, calib, None, True, False, dtype, source, max_boxes)
        fp_pass = [(q_in, fp_out) for (q_in, _), (_, fp_out) in zip(q_pass, fp_pass, strict=True)]
    samples = [UnitSample(tuple(ins[0]), dict(ins[1]), as_streams(out, len(unit.streams))) for ins, out in fp_pass]
    compute = None if dtype is None else next(p.dtype for p in sam.parameters() if p.is_floating_point())
    block_io = BlockIO(unit, samples, inputs, compute_dtype=compute)
    logger.info("block I/O of %s (%s inputs): %d samples, %d prompts, %.1f MiB", unit.name, inputs, len(block_io),
                block_io.num_prompts, block_io.nbytes / 2**20)
    return block_io


def block_io_loss(sam: nn.Module, block_io: BlockIO) -> float:
    """Mean over the block I/O's samples of the sum over streams of the unit's MSE against its FP targets
    (the unit as it is now: hard rounding, eval mode, no gradient)."""
    from carsam.recon.losses import lp_error  # losses imports AdaRound; keep this module's imports light

    module = block_io.unit.module(sam)
    module.eval()
    with torch.no_grad():
        losses = [sum(lp_error(o, t).item() for o, t in zip(block_io.unit.run(module, s.args, s.kwargs), s.targets))
                  for s in block_io.samples]
    return sum(losses) / len(losses)


__all__ = ["INPUT_SOURCES", "BlockIO", "UnitSample", "capture_block_io", "block_io_loss"]

"""Cross-branch interference: the quantized model's error at every step boundary of the decoder.

`boundary_errors` runs up to `max_images` calibration images (those with prompt boxes, in the set's
order) twice through the model, as `SamBoxPredictor` does: once with every quantizer in FP mode and
once with the quantizers as they are. A forward pre-hook on the decoder transformer keeps the
transformer's inputs of both passes (one image at a time, on the model's device); then the step
decomposition (`carsam.recon.spans.trace`) runs on the FP inputs in FP mode and on the quantized
inputs as quantized, in lockstep, and after each step the squared error of the queries and of the
keys is accumulated. Called with an `FpTraces`, as the reconstruction does for all its entries, the FP
side of an image is decoded and traced once and kept (up to `FP_TRACE_BYTES`; beyond it, and without
one, it is traced afresh one state at a time, so memory holds two states and one image's transformer
inputs). Errors are the MSE over all of an image's boxes, tokens and channels, averaged over the images.
The model runs in eval mode (QDrop's random drop is off there whatever `quant_prob` is) under no_grad;
its train/eval flag and quantizer modes are restored.

Recorded after each reconstruction unit (`reconstruct_model_(..., track_interference=True)`), these
show whether optimising one branch (e.g. the token stream) raises the error of the other one or of
boundaries reconstructed earlier: the cross-branch interference of docs/diagnostics.md, "Reconstruction
oscillation".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from carsam.eval.inference import EmbeddingSource, box_predictor, run_image
from carsam.models.quantize import DECODER_SCOPE
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import eval_no_grad, quant_modes_set
from carsam.recon.spans import PROLOGUE, DecoderState, step_names, trace, transformer_inputs

if TYPE_CHECKING:
    from carsam.data.coco import CocoBoxPrompts

logger = logging.getLogger(__name__)

STREAMS = ("queries", "keys")
FP_TRACE_BYTES = 1 << 30  # FP traces kept across the entries of one reconstruction
TransformerInputs = tuple[Tensor, Tensor, Tensor]


def transformer_calls(sam: nn.Module, calib: CocoBoxPrompts, image_id: int, mode: QuantMode | None,
                      source: EmbeddingSource | None = None) -> list[TransformerInputs]:
    """The decoder transformer's inputs, call by call (box chunks), for one image with quantizers in `mode`.

    Each call: image_embedding, image_pe `(B, C, H, W)`, point_embedding `(B, Nq, C)`, detached, on the
    model's device. `mode` None: the quantizers as they are.
    """
    calls: list[TransformerInputs] = []

    def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append(tuple(t.detach() for t in transformer_inputs(args, kwargs)))  # type: ignore[arg-type]

    handle = sam.get_submodule(DECODER_SCOPE).register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with quant_modes_set(sam, mode):
            run_image(box_predictor(sam, source=source), calib, image_id)
    finally:
        handle.remove()
    return calls


def _squared_errors(fp: DecoderState, quantized: DecoderState) -> dict[str, tuple[float, int]]:
    """Per stream, (sum of squared differences, number of elements)."""
    return {name: (float((getattr(quantized, name) - getattr(fp, name)).double().pow(2).sum()),
                   getattr(fp, name).numel()) for name in STREAMS}


def fp_trace(transformer: nn.Module, fp_inputs: TransformerInputs) -> Iterator[tuple[str, DecoderState]]:
    """`trace` of the FP transformer: each step runs with its quantizers in FP mode and the original weights."""
    steps = trace(transformer, *fp_inputs)
    while True:
        with quant_modes_set(transformer, QuantMode.FP):
            item = next(steps, None)
        if item is None:
            return
        yield item


def paired_state_errors(fp_states: Iterable[tuple[str, DecoderState]], transformer: nn.Module,
                        q_inputs: TransformerInputs) -> dict[str, dict[str, tuple[float, int]]]:
    """Per step, per stream (sum of squared errors, count) of the quantized trace of `q_inputs` against
    `fp_states` (an FP trace, lazy or kept); both advance one step at a time."""
    fp_iter = iter(fp_states)
    errors: dict[str, dict[str, tuple[float, int]]] = {}
    for q_name, q_state in trace(transformer, *q_inputs):
        fp_name, fp_state = next(fp_iter)
        if q_name != fp_name:
            raise AssertionError(f"traces out of step: {fp_name} vs {q_name}")
        if q_name != PROLOGUE:
            errors[q_name] = _squared_errors(fp_state, q_state)
    return errors


def paired_errors(transformer: nn.Module, fp_inputs: TransformerInputs,
                  q_inputs: TransformerInputs) -> dict[str, dict[str, tuple[float, int]]]:
    """Per step, per stream (sum of squared errors, count) of the quantized trace against the FP trace.

    The FP trace runs with the transformer's quantizers in FP mode, the quantized one as they are; both
    are advanced one step at a time so only the current pair of states is alive.
    """
    return paired_state_errors(fp_trace(transformer, fp_inputs), transformer, q_inputs)


def trace_nbytes(transformer: nn.Module, inputs: TransformerInputs) -> int:
    """Bytes of a whole trace of `inputs` (every state's four tensors), from the input shapes."""
    image_embedding, _, point_embedding = inputs
    b, c, h, w = image_embedding.shape
    per_state = 2 * image_embedding.element_size() * b * c * (h * w + point_embedding.shape[1])
    return per_state * (len(step_names(transformer)) + 1)


class FpTraces:
    """The FP traces of the interference images, kept across the entries of one reconstruction.

    The FP model never changes while units are reconstructed (FP passes use the original weights), so
    every entry compares against the same FP states: an image's FP decode and trace run once and are
    kept (on the model's device) while they fit `budget_bytes` (estimated from the input shapes before
    running, `trace_nbytes`: on real SAM 10 states x 2 x (4096 + 7) x 256 float32, about 80 MiB per box); an
    image beyond it is traced again at each entry, one state at a time.
    """

    def __init__(self, budget_bytes: int = FP_TRACE_BYTES) -> None:
        self.budget_bytes, self.nbytes = budget_bytes, 0
        self.kept: dict[int, list[list[tuple[str, DecoderState]]]] = {}

    def states(self, sam: nn.Module, calib: CocoBoxPrompts, image_id: int,
               source: EmbeddingSource | None = None) -> list[Iterable[tuple[str, DecoderState]]]:
        """Per transformer call of the image, its FP trace: kept, newly kept, or lazy."""
        if image_id in self.kept:
            return self.kept[image_id]  # type: ignore[return-value]
        transformer = sam.get_submodule(DECODER_SCOPE)
        calls = transformer_calls(sam, calib, image_id, QuantMode.FP, source)
        size = sum(trace_nbytes(transformer, inputs) for inputs in calls)
        if self.nbytes + size > self.budget_bytes:
            return [fp_trace(transformer, inputs) for inputs in calls]
        self.nbytes += size
        self.kept[image_id] = [list(fp_trace(transformer, inputs)) for inputs in calls]
        return self.kept[image_id]  # type: ignore[return-value]


def _image_errors(sam: nn.Module, calib: CocoBoxPrompts, image_id: int, fp_traces: FpTraces,
                  source: EmbeddingSource | None) -> dict[str, dict[str, float]]:
    """One image's per-step, per-stream MSE (over all its box chunks)."""
    fp_states = fp_traces.states(sam, calib, image_id, source)
    q_calls = transformer_calls(sam, calib, image_id, None, source)
    transformer = sam.get_submodule(DECODER_SCOPE)
    totals: dict[str, dict[str, list[float]]] = {}
    for states, q_inputs in zip(fp_states, q_calls, strict=True):
        for step, streams in paired_state_errors(states, transformer, q_inputs).items():
            for name, (sq_sum, count) in streams.items():
                acc = totals.setdefault(step, {}).setdefault(name, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + sq_sum, acc[1] + count
    return {step: {name: s / n for name, (s, n) in streams.items()} for step, streams in totals.items()}


def boundary_errors(sam: nn.Module, calib: CocoBoxPrompts, max_images: int = 4,
                    fp_traces: FpTraces | None = None, source: EmbeddingSource | None = None
                    ) -> dict[str, dict[str, float]]:
    """`{step name: {"queries": mse, "keys": mse}}` of the quantized model against the FP model.

    One entry per decoder step (`carsam.recon.spans.step_names`, in call order), the error after that
    step, averaged over the first `max_images` calibration images with prompt boxes (module docstring).
    fp_traces: FP traces kept from an earlier call on the same model and images (None: traced afresh,
    one state at a time). source: where the passes get image embeddings (None: encode).
    """
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    image_ids = [i for i in calib.image_ids if len(calib.prompts(i)[0]) > 0][:max_images]
    if not image_ids:
        raise ValueError("no calibration image has a prompt box")
    fp_traces = FpTraces(0) if fp_traces is None else fp_traces
    with eval_no_grad(sam):
        per_image = [_image_errors(sam, calib, image_id, fp_traces, source) for image_id in image_ids]
    return {step: {name: sum(img[step][name] for img in per_image) / len(per_image) for name in STREAMS}
            for step in per_image[0]}


__all__ = ["FP_TRACE_BYTES", "STREAMS", "FpTraces", "boundary_errors", "fp_trace", "paired_errors",
           "paired_state_errors", "trace_nbytes", "transformer_calls"]

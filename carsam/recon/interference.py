"""Cross-branch interference: the quantized model's error at every step boundary of the decoder.

`boundary_errors` runs up to `max_images` calibration images (those with prompt boxes, in the set's
order) twice through the model, as `SamBoxPredictor` does: once with every quantizer in FP mode and
once with the quantizers as they are. A forward pre-hook on the decoder transformer keeps the
transformer's inputs of both passes (one image at a time, on the model's device); then the step
decomposition (`carsam.recon.spans.trace`) runs on the FP inputs in FP mode and on the quantized
inputs as quantized, in lockstep, and after each step the squared error of the queries and of the
keys is accumulated (the states are dropped as soon as they are compared, so memory holds two states
and one image's transformer inputs). Errors are the MSE over all of an image's boxes, tokens and
channels, averaged over the images. The model runs in eval mode (QDrop's random drop is off there
whatever `quant_prob` is) under no_grad; its train/eval flag and quantizer modes are restored.

Recorded after each reconstruction unit (`reconstruct_model_(..., track_interference=True)`), these
show whether optimising one branch (e.g. the token stream) raises the error of the other one or of
boundaries reconstructed earlier: the oscillation diagnostic of METHODS.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from carsam.eval.inference import SamBoxPredictor
from carsam.models.quantize import DECODER_SCOPE
from carsam.quant.quantizers import QuantMode
from carsam.recon.cache import quant_modes_set, run_image
from carsam.recon.spans import PROLOGUE, DecoderState, trace, transformer_inputs

if TYPE_CHECKING:
    from carsam.data.coco import CocoBoxPrompts

logger = logging.getLogger(__name__)

STREAMS = ("queries", "keys")
TransformerInputs = tuple[Tensor, Tensor, Tensor]


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad inside the block; the train/eval flag restored after."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def transformer_calls(sam: nn.Module, calib: CocoBoxPrompts, image_id: int,
                      mode: QuantMode | None) -> list[TransformerInputs]:
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
            run_image(SamBoxPredictor(sam), calib, image_id, encoder_only=False)
    finally:
        handle.remove()
    return calls


def _squared_errors(fp: DecoderState, quantized: DecoderState) -> dict[str, tuple[float, int]]:
    """Per stream, (sum of squared differences, number of elements)."""
    return {name: (float((getattr(quantized, name) - getattr(fp, name)).double().pow(2).sum()),
                   getattr(fp, name).numel()) for name in STREAMS}


def paired_errors(transformer: nn.Module, fp_inputs: TransformerInputs,
                  q_inputs: TransformerInputs) -> dict[str, dict[str, tuple[float, int]]]:
    """Per step, per stream (sum of squared errors, count) of the quantized trace against the FP trace.

    The FP trace runs with the transformer's quantizers in FP mode, the quantized one as they are; both
    are advanced one step at a time so only the current pair of states is alive.
    """
    fp_trace = trace(transformer, *fp_inputs)
    q_trace = trace(transformer, *q_inputs)
    errors: dict[str, dict[str, tuple[float, int]]] = {}
    for q_name, q_state in q_trace:
        with quant_modes_set(transformer, QuantMode.FP):
            fp_name, fp_state = next(fp_trace)
        if q_name != fp_name:
            raise AssertionError(f"traces out of step: {fp_name} vs {q_name}")
        if q_name != PROLOGUE:
            errors[q_name] = _squared_errors(fp_state, q_state)
    return errors


def _image_errors(sam: nn.Module, calib: CocoBoxPrompts, image_id: int) -> dict[str, dict[str, float]]:
    """One image's per-step, per-stream MSE (over all its box chunks)."""
    fp_calls = transformer_calls(sam, calib, image_id, QuantMode.FP)
    q_calls = transformer_calls(sam, calib, image_id, None)
    transformer = sam.get_submodule(DECODER_SCOPE)
    totals: dict[str, dict[str, list[float]]] = {}
    for fp_inputs, q_inputs in zip(fp_calls, q_calls, strict=True):
        for step, streams in paired_errors(transformer, fp_inputs, q_inputs).items():
            for name, (sq_sum, count) in streams.items():
                acc = totals.setdefault(step, {}).setdefault(name, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + sq_sum, acc[1] + count
    return {step: {name: s / n for name, (s, n) in streams.items()} for step, streams in totals.items()}


def boundary_errors(sam: nn.Module, calib: CocoBoxPrompts, max_images: int = 4) -> dict[str, dict[str, float]]:
    """`{step name: {"queries": mse, "keys": mse}}` of the quantized model against the FP model.

    One entry per decoder step (`carsam.recon.spans.step_names`, in call order), the error after that
    step, averaged over the first `max_images` calibration images with prompt boxes (module docstring).
    """
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    image_ids = [i for i in calib.image_ids if len(calib.prompts(i)[0]) > 0][:max_images]
    if not image_ids:
        raise ValueError("no calibration image has a prompt box")
    with _eval_no_grad(sam):
        per_image = [_image_errors(sam, calib, image_id) for image_id in image_ids]
    return {step: {name: sum(img[step][name] for img in per_image) / len(per_image) for name in STREAMS}
            for step in per_image[0]}


__all__ = ["STREAMS", "boundary_errors", "paired_errors", "transformer_calls"]

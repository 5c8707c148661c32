"""Model-wide quantizer state: the mode of every quantizer, QDrop's keep probability, the eval-ready check,
the FP-weight swap, and the context managers that set them for a block and restore them after.

Every function here acts on all quantizers (`iter_quantizers`) of the module it is given; a quantizer's
own state and math live in `carsam.quant.quantizers`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from carsam.quant.fp_reference import SUFFIX, fp_references
from carsam.quant.quantizers import QuantizerBase, QuantMode, iter_quantizers

logger = logging.getLogger(__name__)


def set_quant_mode(model: nn.Module, mode: QuantMode | str) -> None:
    """Put every quantizer of `model` in `mode`.

    Switching to QUANTIZED first finalizes the calibration of every quantizer with pending statistics
    (`has_pending_calibration`: activations observed in CALIBRATE mode, weights fed by `calibrate_weight`).
    """
    mode = QuantMode(mode)
    finalized = 0
    for path, quantizer in iter_quantizers(model):
        quantizer.path = path
        if mode is QuantMode.QUANTIZED and quantizer.has_pending_calibration:
            quantizer.finalize_calibration()
            finalized += 1
        quantizer.mode = mode
    logger.debug("quant mode -> %s (%d quantizers finalized)", mode.value, finalized)


def quant_modes(model: nn.Module) -> dict[str, QuantMode]:
    """The mode of every quantizer, by module path."""
    return {path: quantizer.mode for path, quantizer in iter_quantizers(model)}


def assert_quant_mode(model: nn.Module, mode: QuantMode | str) -> None:
    """Raise `AssertionError` listing the quantizers of `model` that are not in `mode`."""
    mode = QuantMode(mode)
    offending = {path: m.value for path, m in quant_modes(model).items() if m is not mode}
    if offending:
        raise AssertionError(f"{len(offending)} quantizer(s) not in mode '{mode.value}': {offending}")


def _weight_quantizer_ids(model: nn.Module) -> set[int]:
    """Ids of the quantizers held as `weight_quantizer` by a weight layer (QuantLinear, QuantConv2d)."""
    return {id(q) for m in model.modules() if isinstance(q := getattr(m, "weight_quantizer", None), nn.Module)}


def set_quant_prob(model: nn.Module, p: float, *, weights: bool = False) -> None:
    """Set QDrop's `quant_prob` to `p` on the quantizers of `model`.

    `p < 1` goes to the activation quantizers only (QDrop drops activations; weights are rounded by
    AdaRound), unless `weights=True`. `p == 1` resets every quantizer, weights included, so one call
    undoes any earlier setting (the PTQ4SAM evaluation bug reset only some of them).
    """
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"quant_prob must be in [0, 1], got {p}")
    skip = set() if weights or p == 1.0 else _weight_quantizer_ids(model)
    count = 0
    for _, quantizer in iter_quantizers(model):
        if id(quantizer) not in skip:
            quantizer.quant_prob = p
            count += 1
    logger.debug("quant_prob -> %s on %d quantizers", p, count)


def assert_eval_ready(model: nn.Module) -> None:
    """Raise `AssertionError` listing every quantizer of `model` not ready for evaluation.

    Ready: mode QUANTIZED, `quant_prob == 1.0`, calibrated, and (AdaRound) hard rounding. A model
    without quantizers passes.
    """
    offending = {path: problems for path, q in iter_quantizers(model) if (problems := q.eval_problems())}
    if offending:
        listed = "; ".join(f"'{path}': {', '.join(problems)}" for path, problems in offending.items())
        raise AssertionError(f"{len(offending)} quantizer(s) not ready for evaluation: {listed}")


@contextlib.contextmanager
def fp_weights(model: nn.Module) -> Iterator[None]:
    """Inside the block, every Parameter of `model` with an FP reference holds its original value (the same
    Parameter objects, their `.data` swapped); the current values are put back on exit."""
    swapped = []
    try:
        for module, name in fp_references(model):
            param = getattr(module, name)
            swapped.append((param, param.data))
            param.data = getattr(module, name + SUFFIX)
        yield
    finally:
        for param, data in swapped:
            param.data = data


@contextlib.contextmanager
def quant_modes_set(model: nn.Module, mode: QuantMode | None) -> Iterator[None]:
    """Put every quantizer of `model` in `mode` (None: leave them), restoring each one's mode after.

    Assigns `quantizer.mode` directly, so no pending calibration is finalized on the way. In FP mode the
    Parameters a method changed in place hold their original values too (`fp_weights`), so the block
    runs the FP model.
    """
    saved: list[tuple[QuantizerBase, QuantMode]] = [(q, q.mode) for _, q in iter_quantizers(model)]
    try:
        if mode is not None:
            for quantizer, _ in saved:
                quantizer.mode = mode
        with fp_weights(model) if mode is QuantMode.FP else contextlib.nullcontext():
            yield
    finally:
        for quantizer, previous in saved:
            quantizer.mode = previous


@contextlib.contextmanager
def eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad inside the block; the train/eval flag restored after."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)

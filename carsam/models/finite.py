"""Finite-value guards: a NaN or an Inf in a weight, a quantizer's parameters or a model output stops the run.

A model with one NaN weight still produces masks (all empty, or all full) and a COCO evaluation of them
scores mAP 0: without a guard that is a completed run with a real-looking, terrible result, in the report and
in a sweep. The pipeline calls `check_finite_` after loading the checkpoint and after each method stage that
changes weights or quantizer parameters (calibration, BIG, MAC, each reconstruction unit, rounding), and the
predictor calls `check_finite_output` on the encoder's and the decoder's outputs; each raises
`NonFiniteError` naming the stage and the first offending tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class NonFiniteError(ValueError):
    """A parameter, buffer or output holds NaN or +-Inf."""


def non_finite_tensors(module: nn.Module) -> list[tuple[str, int, int]]:
    """`(name, non-finite count, numel)` of every floating parameter and buffer of `module` that holds a NaN
    or an Inf, in `named_parameters` then `named_buffers` order."""
    found = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and (bad := _non_finite_count(tensor)):
            found.append((name, bad, tensor.numel()))
    return found


def _non_finite_count(tensor: Tensor) -> int:
    """How many NaN/Inf values `tensor` holds; one `all()` reduction in the usual, finite case."""
    finite = torch.isfinite(tensor.detach())
    return 0 if bool(finite.all()) else int((~finite).sum())


def check_finite_(module: nn.Module, stage: str) -> None:
    """Raise `NonFiniteError` if any floating parameter or buffer of `module` is not finite.

    The message names `stage` (e.g. "loading the checkpoint", "reconstruction of decoder.layers.0"), the
    first offending tensor and how many more there are.
    """
    found = non_finite_tensors(module)
    if found:
        name, bad, numel = found[0]
        more = f" (and {len(found) - 1} more tensor{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
        raise NonFiniteError(f"non-finite values after {stage}: {name} has {bad} NaN/Inf of {numel}{more}")


def check_finite_output(tensor: Tensor, what: str) -> None:
    """Raise `NonFiniteError` if `tensor` (a model output, e.g. "the decoder's IoU predictions") holds NaN/Inf."""
    bad = _non_finite_count(tensor)
    if bad:
        raise NonFiniteError(f"{what} hold {bad} NaN/Inf values of {tensor.numel()}: the model's weights or "
                             "activations are not finite (a corrupt checkpoint, or a method that diverged)")


__all__ = ["NonFiniteError", "check_finite_", "check_finite_output", "non_finite_tensors"]

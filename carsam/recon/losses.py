"""Reconstruction losses: a per-stream Lp error and the AdaRound rounding regulariser.

`stream_losses` returns one scalar per output stream so a caller can weight them (a block's queries
are 7 rows per box, its keys thousands: a per-stream mean keeps both on the same scale).
`stream_target_variance` gives each stream's FP-target variance over a unit's cache, for weights that
make each stream's MSE a relative error (JCAR's `variance_weighting`, `carsam.methods.jcar`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from carsam.quant.adaround import AdaRoundQuantizer

if TYPE_CHECKING:
    from carsam.recon.block_io import UnitCache


REDUCTIONS = ("mean", "qdrop")


def lp_error(pred: Tensor, target: Tensor, p: float = 2.0, reduction: str = "mean") -> Tensor:
    """Lp reconstruction error of `pred` against `target` (same shape, batch first). Scalar.

    reduction: `mean` = `mean(|pred - target|^p)` over all elements (p = 2: the MSE); `qdrop` =
    QDrop/BRECQ/PTQ4SAM's `lp_loss`: `|pred - target|^p` summed over dim 1, averaged over the rest
    (the scale the AdaRound regulariser weight 0.01 was tuned against).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    err = (pred - target.to(pred.dtype)).abs().pow(p)
    if reduction == "mean":
        return err.mean()
    if reduction == "qdrop":
        return err.sum(1).mean() if err.dim() > 1 else err.mean()
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got '{reduction}'")


def stream_losses(preds: Sequence[Tensor], targets: Sequence[Tensor], names: Sequence[str],
                  p: float = 2.0, reduction: str = "mean") -> dict[str, Tensor]:
    """`{name: lp_error(pred, target, p, reduction)}` for each output stream, in `names` order."""
    if not len(preds) == len(targets) == len(names):
        raise ValueError(f"{len(preds)} predictions, {len(targets)} targets, {len(names)} stream names")
    return {name: lp_error(pred, tgt, p, reduction) for name, pred, tgt in zip(names, preds, targets)}


def weighted_sum(losses: Mapping[str, Tensor], weights: Mapping[str, float] | None = None) -> Tensor:
    """`sum_s w_s * loss_s` (w_s = 1 for streams missing from `weights`). Scalar."""
    weights = weights or {}
    unknown = sorted(set(weights) - set(losses))
    if unknown:
        raise ValueError(f"weights given for unknown streams {unknown}; streams: {sorted(losses)}")
    return torch.stack([weights.get(name, 1.0) * loss for name, loss in losses.items()]).sum()


def pooled_variance(tensors: Sequence[Tensor]) -> float:
    """Population variance (divide by the count) of all elements of `tensors` together, in float64."""
    count = sum(t.numel() for t in tensors)
    if count == 0:
        raise ValueError("the variance of no element is undefined")
    mean = sum(float(t.double().sum()) for t in tensors) / count
    return sum(float((t.double() - mean).square().sum()) for t in tensors) / count


def stream_target_variance(cache: UnitCache) -> dict[str, float]:
    """`{stream: variance}` of each stream's FP targets, pooled over every element of every sample.

    Raises `ValueError` if a stream's targets are constant (the variance would divide a weight by 0).
    """
    variances = {}
    for index, name in enumerate(cache.unit.streams):
        variances[name] = pooled_variance([sample.targets[index] for sample in cache.samples])
        if not variances[name] > 0.0:
            raise ValueError(f"the FP targets of stream '{name}' of unit '{cache.unit.name}' have no variance")
    return variances


def rounding_regularizer(quantizers: Iterable[AdaRoundQuantizer], beta: float) -> Tensor:
    """`sum over quantizers and weights of (1 - |2h(alpha) - 1|^beta)`, unweighted. Scalar (0 if none)."""
    terms = [q.regularizer(beta) for q in quantizers]
    return torch.stack(terms).sum() if terms else torch.zeros(())


__all__ = ["REDUCTIONS", "lp_error", "pooled_variance", "rounding_regularizer", "stream_losses",
           "stream_target_variance", "weighted_sum"]

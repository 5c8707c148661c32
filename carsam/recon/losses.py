"""Reconstruction losses: a per-stream Lp error and the AdaRound rounding regulariser.

`stream_losses` returns one scalar per output stream so a caller can weight them (a block's queries
are 7 rows per box, its keys thousands: a per-stream mean keeps both on the same scale).
`stream_target_variance` gives each stream's FP-target variance over a unit's block I/O, for weights that
make each stream's MSE a relative error (JCAR's `variance_weighting`, `carsam.methods.jcar`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from carsam.quant.adaround import AdaRoundQuantizer

if TYPE_CHECKING:
    from carsam.recon.block_io import BlockIO


REDUCTIONS = ("mean", "qdrop")


def lp_error(pred: Tensor, target: Tensor, p: float = 2.0, reduction: str = "mean") -> Tensor:
    """Lp reconstruction error of `pred` against `target`: a 0-dim tensor.

    pred, target: the same shape, batch first, e.g. a decoder stream `(B, N, E)` (B boxes, N tokens) or an
    encoder block's output `(1, H, W, C)`; `target` is cast to `pred`'s dtype. With `e = |pred - target|^p`
    elementwise, reduction
    - `mean`: `e.mean()` over all elements (p = 2: the MSE);
    - `qdrop`: QDrop/BRECQ/PTQ4SAM's `lp_loss`, `e.sum(1).mean()`: summed over dim 1 (the N tokens of
      `(B, N, E)`, the H rows of `(1, H, W, C)`), then averaged over every remaining element, i.e.
      `pred.shape[1]` times `mean`; a 1-D input gets `e.mean()`. The AdaRound regulariser weight 0.01
      was tuned against this scale.
    Raises ValueError on differing shapes or an unknown reduction.
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
    """`{name: lp_error(pred, target, p, reduction)}` for each output stream, in `names` order.

    preds, targets, names: one entry per stream, `preds[i]` and `targets[i]` of one shape (e.g. queries
    `(B, Nq, E)` and keys `(B, Nk, E)` of a two-stream unit). Each value is a 0-dim tensor.
    """
    if not len(preds) == len(targets) == len(names):
        raise ValueError(f"{len(preds)} predictions, {len(targets)} targets, {len(names)} stream names")
    return {name: lp_error(pred, tgt, p, reduction) for name, pred, tgt in zip(names, preds, targets)}


def weighted_sum(losses: Mapping[str, Tensor], weights: Mapping[str, float] | None = None) -> Tensor:
    """`sum_s w_s * loss_s` over the streams of `losses` (`{stream: 0-dim tensor}`): a 0-dim tensor.

    `weights`: `{stream: float}`; w_s = 1 for streams missing from it; a stream not in `losses` raises ValueError.
    """
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


def stream_target_variance(block_io: BlockIO) -> dict[str, float]:
    """`{stream: variance}` (a float) of each stream's FP targets, pooled over every element of every sample
    (a sample is one image with all its boxes: a decoder stream's target is `(B_i, N, E)`, `B_i` its boxes).

    Raises `ValueError` if a stream's targets are constant (the variance would divide a weight by 0).
    """
    variances = {}
    for index, name in enumerate(block_io.unit.streams):
        variances[name] = pooled_variance([sample.targets[index] for sample in block_io.samples])
        if not variances[name] > 0.0:
            raise ValueError(f"the FP targets of stream '{name}' of unit '{block_io.unit.name}' have no variance")
    return variances


def rounding_regularizer(quantizers: Iterable[AdaRoundQuantizer], beta: float) -> Tensor:
    """`sum over quantizers and weight elements of (1 - |2h(alpha) - 1|^beta)`, unweighted: a 0-dim tensor.

    Each quantizer's `h(alpha)` has its weight's shape (`AdaRoundQuantizer.regularizer`); with no quantizer
    the result is `torch.zeros(())` on the CPU.
    """
    terms = [q.regularizer(beta) for q in quantizers]
    return torch.stack(terms).sum() if terms else torch.zeros(())


__all__ = ["REDUCTIONS", "lp_error", "pooled_variance", "rounding_regularizer", "stream_losses",
           "stream_target_variance", "weighted_sum"]

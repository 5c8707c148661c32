"""Joint Cross-Attention Reconstruction (JCAR): the loss of each reconstruction unit from a `JcarConfig`.

JCAR reconstructs coupled attention branches together: its units are `carsam.recon.units`' `block`,
`pair` or `chain` groupings, whose two-stream units (a block or a span of decoder steps) output the
token stream (queries) and the image stream (keys). Our reading of its loss (docs/methods.md, "CAR-SAM:
our reading"):

    loss = w_tokens * MSE(queries) + w_image * MSE(keys)

each MSE a plain per-stream mean (`reduction="mean"`: 7 token rows per box and thousands of image rows
on the same scale); with `variance_weighting` each weight is also divided by the variance of that
stream's FP targets over the unit's block I/O (`stream_target_variance`), making each term a relative error.

Single-stream units of these groupings (the attentions and MLPs left alone) keep the base settings
unchanged (weight 1, the base reduction): they are reconstructed exactly as in `attention_mlp`, so
a JCAR ablation differs from PTQ4SAM's units only where branches are joined. Note that `mean` is
smaller than QDrop's default `qdrop` reduction (which sums over tokens), so the AdaRound regulariser
weight weighs relatively more on the span units.

`jcar_settings_for(base, jcar)` is the `settings_for` hook of
`carsam.recon.driver.reconstruct_model_`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from carsam.recon.losses import stream_target_variance
from carsam.recon.stage import ReconSettings
from carsam.recon.units import BLOCK_STREAMS, ReconUnit

if TYPE_CHECKING:
    from carsam.config import JcarConfig
    from carsam.recon.block_io import BlockIO

JCAR_REDUCTION = "mean"


def jcar_stream_weights(unit: ReconUnit, jcar: JcarConfig, block_io: BlockIO | None = None) -> dict[str, float]:
    """`{stream: weight}` of `unit`'s loss: queries `w_tokens`, keys `w_image` (divided by the stream's
    FP-target variance over `block_io` with `variance_weighting`); 1 for each stream of any other unit."""
    if unit.streams != BLOCK_STREAMS:
        return {name: 1.0 for name in unit.streams}
    weights = {"queries": jcar.w_tokens, "keys": jcar.w_image}
    if not jcar.variance_weighting:
        return weights
    if block_io is None:
        raise ValueError("variance_weighting needs the unit's block I/O (the variance of its FP targets)")
    variance = stream_target_variance(block_io)
    return {name: weight / variance[name] for name, weight in weights.items()}


def jcar_settings(base: ReconSettings, unit: ReconUnit, block_io: BlockIO, jcar: JcarConfig) -> ReconSettings:
    """`base` with JCAR's stream weights and per-stream mean for a two-stream unit; `base` otherwise."""
    if unit.streams != BLOCK_STREAMS:
        return base
    weights = tuple(jcar_stream_weights(unit, jcar, block_io).items())
    return dataclasses.replace(base, reduction=JCAR_REDUCTION, stream_weights=weights)


def jcar_settings_for(base: ReconSettings, jcar: JcarConfig) -> Callable[[ReconUnit, BlockIO], ReconSettings]:
    """The per-unit settings hook for `reconstruct_model_(..., settings_for=...)`."""
    return lambda unit, block_io: jcar_settings(base, unit, block_io, jcar)


__all__ = ["JCAR_REDUCTION", "jcar_settings", "jcar_settings_for", "jcar_stream_weights"]

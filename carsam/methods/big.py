"""PTQ4SAM's Bimodal Integration (BIG) for the mask decoder's attentions.

The keys `K = k_proj(x)` of token->image attention are bimodal *per tensor*: most channels sit around
either +a or -a, so the pooled distribution, which a per-tensor quantizer sees, has two peaks and
wastes the grid between them. A per-channel sign `s_c` in {+1, -1} multiplied into row `c` of both
`k_proj` and `q_proj` (weight and bias) flips channel `c` of K and of Q; every score
`q·k = sum_c (s_c q_c)(s_c k_c)` is unchanged (exactly: each product is sign-flipped twice), and with
the right signs every channel's bulk is positive, so the pooled K is unimodal.

The statistics (our reading; PTQ4SAM's paper does not pin them down):

- `channel_signs`: the *majority sign* of each channel, +1 if at least as many of its values are
  positive as negative, else -1. It equals the sign of the channel's median, i.e. the side holding
  the larger mass (the dominant mode). Unlike the sign of the mean it cannot be flipped by a few large
  values of the minority side, and it is a count, so it accumulates exactly over calibration batches.
- `is_bimodal`: Sarle's bimodality coefficient of the pooled values (all tokens and channels),
  `BC = (g^2 + 1) / (k + 3 (n-1)^2 / ((n-2)(n-3)))` with `g` the sample skewness and `k` the sample
  excess kurtosis; bimodal when `BC > 5/9` (the value of the uniform distribution; a Gaussian gives
  1/3, two well separated equal modes approach 1).

Order in a run (docs/methods.md, "PTQ4SAM: BIG and AGQ"): quantize -> BIG -> AGQ -> calibrate -> MAC and
reconstruction. Folding changes the weights of `q_proj`/`k_proj` and the distributions of Q and K, so their
weight quantizers and the `qk_matmul` operand quantizers must be (re)calibrated after `fold_signs_`; it
warns when they hold qparams.
"""

from __future__ import annotations

import logging
from typing import TypeAlias

import torch
from segment_anything.modeling import transformer
from torch import Tensor, nn

from carsam.models.adapters import LinearLayer, QuantDecoderAttention
from carsam.models.architecture import decoder_attentions
from carsam.quant.quantizers import QuantizerBase

logger = logging.getLogger(__name__)

BIMODALITY_THRESHOLD = 5.0 / 9.0
DecoderAttention: TypeAlias = transformer.Attention | QuantDecoderAttention


def channel_signs(keys: Tensor) -> Tensor:
    """Per-channel majority sign of `keys` `(..., C)` (channels last, e.g. `(B, N, C)`): `(C,)` float32 of ±1.

    +1 where at least as many values are positive as negative (ties and all-zero channels: +1).
    """
    flat = keys.detach().reshape(-1, keys.shape[-1])
    balance = (flat > 0).sum(dim=0) - (flat < 0).sum(dim=0)
    return torch.where(balance >= 0, 1.0, -1.0).to(torch.float32)


def bimodality_coefficient(x: Tensor) -> float:
    """Sarle's bimodality coefficient of all values of `x` (any shape, at least 4 values), in float64.

    Returns 0.0 for a constant input (no spread: not bimodal).
    """
    n = x.numel()
    if n < 4:
        raise ValueError(f"the bimodality coefficient needs at least 4 values, got {n}")
    d = x.detach().double().flatten()
    d = d - d.mean()
    return bimodality_from_moments(n, float((d**2).mean()), float((d**3).mean()), float((d**4).mean()))


def bimodality_from_moments(n: int, m2: float, m3: float, m4: float) -> float:
    """Sarle's bimodality coefficient from the count `n` (>= 4) and the central moments m2, m3, m4 (population,
    i.e. divided by n), with the sample-size corrections of skewness and excess kurtosis; 0.0 if m2 == 0."""
    if n < 4:
        raise ValueError(f"the bimodality coefficient needs at least 4 values, got {n}")
    if m2 <= 0.0:
        return 0.0  # no spread (a channel that is constant up to rounding gives noise: see ChannelMoments)
    skew = m3 / m2**1.5 * (n * (n - 1)) ** 0.5 / (n - 2)
    excess = ((n + 1) * (m4 / m2**2 - 3.0) + 6.0) * (n - 1) / ((n - 2) * (n - 3))
    return float((skew**2 + 1.0) / (excess + 3.0 * (n - 1) ** 2 / ((n - 2) * (n - 3))))


def is_bimodal(keys: Tensor, threshold: float = BIMODALITY_THRESHOLD) -> bool:
    """Whether the pooled distribution of `keys` (any shape) is bimodal: bimodality coefficient > `threshold`."""
    return bimodality_coefficient(keys) > threshold


def _projections(attn: DecoderAttention) -> tuple[LinearLayer, LinearLayer]:
    if not isinstance(attn, decoder_attentions()):
        raise TypeError(f"fold_signs_ needs a decoder Attention or QuantDecoderAttention, got {type(attn).__name__}")
    return getattr(attn, "q_proj"), getattr(attn, "k_proj")  # (isinstance on a computed tuple does not narrow)


def fold_signs_(attn: DecoderAttention, signs: Tensor) -> DecoderAttention:
    """Multiply row `c` of `q_proj` and `k_proj` (weight `(C, E)` and bias `(C,)`) by `signs[c]`, in place.

    Args:
        attn: a mask-decoder `Attention` or its `QuantDecoderAttention` twin (Linear or QuantLinear
            projections); `C` is its internal dim.
        signs: `(C,)` of ±1, e.g. from `channel_signs(k_proj(keys))`.

    Q·Kᵀ (hence the attention output) is unchanged in full precision.
    """
    q_proj, k_proj = _projections(attn)
    c = k_proj.weight.shape[0]
    if signs.shape != (c,) or q_proj.weight.shape[0] != c:
        raise ValueError(f"signs must have shape ({c},) matching q_proj/k_proj rows, got {tuple(signs.shape)}")
    if not bool((signs.abs() == 1).all()):
        raise ValueError("signs must be +1 or -1")
    with torch.no_grad():
        for proj in (q_proj, k_proj):
            s = signs.to(proj.weight.device, proj.weight.dtype)
            proj.weight.mul_(s[:, None])
            if proj.bias is not None:
                proj.bias.mul_(s)
    stale = _stale_quantizers(attn)
    if stale:
        logger.warning("fold_signs_: recalibrate %s (their qparams predate the sign folding)", stale)
    return attn


def _stale_quantizers(attn: nn.Module) -> list[str]:
    """Calibrated quantizers whose data folding changes: weight quantizers of q_proj/k_proj and the
    `qk_matmul` operands (the projections' *input* quantizers see unchanged data)."""
    stale = []
    for name in ("q_proj", "k_proj"):
        quantizer = getattr(getattr(attn, name), "weight_quantizer", None)
        if isinstance(quantizer, QuantizerBase) and quantizer.is_calibrated:
            stale.append(f"{name}.weight_quantizer")
    matmul = getattr(attn, "qk_matmul", None)
    for name in ("lhs_quantizer", "rhs_quantizer"):
        quantizer = getattr(matmul, name, None)
        if isinstance(quantizer, QuantizerBase) and quantizer.is_calibrated:
            stale.append(f"qk_matmul.{name}")
    return stale


def integrate_bimodal_(attn: DecoderAttention, keys: Tensor, threshold: float = BIMODALITY_THRESHOLD) -> Tensor | None:
    """BIG on one attention: if `keys` (its FP `k_proj` output on calibration data, `(..., C)`) is
    bimodal, fold `channel_signs(keys)` into it and return the signs `(C,)`; else return None."""
    if not is_bimodal(keys, threshold):
        return None
    signs = channel_signs(keys)
    fold_signs_(attn, signs)
    logger.info("BIG: folded %d negative channels of %d", int((signs < 0).sum()), signs.numel())
    return signs


__all__ = ["BIMODALITY_THRESHOLD", "bimodality_coefficient", "bimodality_from_moments", "channel_signs",
           "fold_signs_", "integrate_bimodal_", "is_bimodal"]

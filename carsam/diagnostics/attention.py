"""Attention-dissipation statistics: pure functions on softmax probability tensors.

`P` is a tensor of attention probabilities whose last two dimensions are (query rows, key columns):
`(..., Nq, Nk)`, each row a softmax output (non-negative, summing to 1; rows are not renormalised).
Statistics are computed in at least float32 (half-precision inputs are upcast) and keep the leading
dimensions: one value per row, `(..., Nq)`.

- `normalized_entropy`: Shannon entropy of each row divided by log(Nk), in [0, 1] (1 = uniform).
- `kl_divergence`: KL(P_fp || P_q) of each row, in nats.
- `mask_mass`: the share of each row's mass on the key tokens inside an object's mask, with the mask
  given as one weight in [0, 1] per key token (`mask_to_tokens` makes them from a GT mask).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _as_float(x: Tensor) -> Tensor:
    """`x` in float32 or a wider floating type."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def normalized_entropy(P: Tensor) -> Tensor:
    """Normalised Shannon entropy of each row: `-sum_j p_j ln p_j / ln(Nk)` (with 0 ln 0 = 0).

    P `(..., Nq, Nk)` -> `(..., Nq)`, in [0, 1]: 1 for a uniform row, 0 for a one-hot row. Rows of
    length Nk == 1 carry no uncertainty and give 0.
    """
    num_keys = P.shape[-1]
    if num_keys == 1:
        return _as_float(P).new_zeros(P.shape[:-1])
    p = _as_float(P)
    return -torch.special.xlogy(p, p).sum(dim=-1) / math.log(num_keys)


def kl_divergence(P_fp: Tensor, P_q: Tensor, eps: float = 1e-12) -> Tensor:
    """KL(P_fp || P_q) of each row in nats: `sum_j p_j (ln(p_j + eps) - ln(q_j + eps))`.

    P_fp, P_q `(..., Nq, Nk)` (same shape) -> `(..., Nq)`. The `eps` added to both sides keeps the
    value finite where q_j = 0 < p_j and makes it exactly 0 when `P_q` equals `P_fp`; terms with
    p_j = 0 contribute 0. For distributions bounded away from 0 it equals the textbook KL up to
    O(eps / min q).
    """
    if P_fp.shape != P_q.shape:
        raise ValueError(f"P_fp and P_q must have the same shape, got {tuple(P_fp.shape)} and {tuple(P_q.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    p, q = _as_float(P_fp), _as_float(P_q)
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(dim=-1)


def mask_mass(P: Tensor, mask_tokens: Tensor) -> Tensor:
    """Share of each row's mass on the masked key tokens: `sum_j p_j * w_j`.

    P `(..., Nq, Nk)`; mask_tokens `(..., Nk)`, one weight w_j in [0, 1] per key token (1 = inside
    the mask; fractions for partly covered tokens), its leading dimensions broadcastable against P's.
    Returns `(..., Nq)`, in [0, 1] for probability rows.
    """
    if mask_tokens.shape[-1] != P.shape[-1]:
        raise ValueError(f"mask_tokens has {mask_tokens.shape[-1]} tokens but P rows have {P.shape[-1]}")
    p = _as_float(P)
    return (p @ mask_tokens.to(p.dtype).unsqueeze(-1)).squeeze(-1)


def mask_to_tokens(masks: Tensor, input_size: tuple[int, int], img_size: int, grid: int) -> Tensor:
    """GT masks in image pixels -> the fraction of each image-embedding token's patch they cover.

    masks `(M, H, W)` (bool or float in [0, 1]) -> `(M, grid * grid)` float32, tokens in row-major order
    (index `row * grid + col`, the order of SAM's flattened image embedding). Exactly as SAM frames
    the image: (1) the mask is resized to the model's input frame `input_size = (h, w)` (long side
    = `img_size`) by area averaging (`F.interpolate(mode="area")`, i.e. adaptive average pooling);
    (2) zero-padded at the bottom and right to `img_size x img_size`; (3) averaged over each
    `img_size / grid`-pixel patch. The weight is the soft fraction (no threshold), so objects smaller
    than one patch keep a non-zero weight.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (M, H, W), got shape {tuple(masks.shape)}")
    if img_size % grid:
        raise ValueError(f"img_size {img_size} is not a multiple of the token grid {grid}")
    h, w = input_size
    if not (0 < h <= img_size and 0 < w <= img_size):
        raise ValueError(f"input_size {input_size} must fit in img_size {img_size}")
    framed = F.interpolate(masks[:, None].float(), size=(h, w), mode="area")  # (M, 1, h, w)
    padded = F.pad(framed, (0, img_size - w, 0, img_size - h))  # (M, 1, S, S)
    patch = img_size // grid
    return F.avg_pool2d(padded, kernel_size=patch).flatten(1)  # (M, grid * grid)


__all__ = ["kl_divergence", "mask_mass", "mask_to_tokens", "normalized_entropy"]

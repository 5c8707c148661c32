"""Pure quantization primitives: bit-width checks, integer ranges, qparams, STE rounding, fake-quant.

Everything here is a stateless function of its arguments. Conventions:

- A *range* is `(xmin, xmax)`: 0-dim tensors for per-tensor quantization, shape `(C,)` for
  per-channel quantization along some axis of a tensor with `C` channels on that axis.
- *qparams* are `(scale, zero_point)` with the range's shape; `zero_point` is a float tensor holding
  integer values (so it can be broadcast and differentiated through like `scale`).
- Fake quantization is `(clamp(round(x / s) + z, qmin, qmax) - z) * s`, the same arithmetic as
  `torch.fake_quantize_per_{tensor,channel}_affine` (including multiplying by `1 / s`), so results are
  bit-identical to PyTorch's kernels for the same qparams.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

MIN_BITS = 2
MAX_BITS = 16
SYMMETRIC_SCALES = ("qmax", "half_range")  # symmetric scale = absmax / qmax, or absmax / (2^(b-1) - 0.5)


def validate_bits(bits: int, name: str = "bits") -> int:
    """Return `bits` as an `int` if it is an integer in 2..16 (`bool` excluded), else raise `ValueError`."""
    is_int = isinstance(bits, numbers.Integral) and not isinstance(bits, bool)
    if not is_int or not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"{name} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return int(bits)


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer grid `(qmin, qmax)`: `(0, 2^b - 1)`, or `(-2^(b-1), 2^(b-1) - 1)` if symmetric."""
    bits = validate_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def qparams_from_range(
    xmin: Tensor, xmax: Tensor, bits: int, symmetric: bool, eps: float = 1e-8, symmetric_scale: str = "qmax"
) -> tuple[Tensor, Tensor]:
    """Scale and zero point that cover `[xmin, xmax]` (widened to include 0), elementwise.

    Args:
        xmin, xmax: range endpoints, any (equal) shape: `()` per tensor, `(C,)` per channel.
        bits: bit width in 2..16.
        symmetric: if True, the grid is `[-absmax, absmax]` with `absmax = max(|xmin|, |xmax|)`,
            `scale = absmax / qmax` (no clipping of either endpoint) and `zero_point = 0`.
        eps: lower bound on the scale (an all-zero range gets scale `eps`).
        symmetric_scale: `qmax` (the above) or `half_range`, `scale = absmax / ((qmax - qmin) / 2)` =
            `absmax / (2^(b-1) - 0.5)`, the convention of torch's observers and QDrop's code (it clips
            `+absmax` by half a step and spends the grid evenly on both signs). Ignored when asymmetric.

    Returns:
        `(scale, zero_point)`, float32 tensors of the ranges' shape; `zero_point` is integer-valued
        and clamped into `integer_range(bits, symmetric)`, so 0 is exactly representable.
    """
    qmin, qmax = integer_range(bits, symmetric)
    xmin = torch.clamp(torch.as_tensor(xmin, dtype=torch.float32), max=0.0)
    xmax = torch.clamp(torch.as_tensor(xmax, dtype=torch.float32), min=0.0)
    if symmetric_scale not in SYMMETRIC_SCALES:
        raise ValueError(f"symmetric_scale must be one of {SYMMETRIC_SCALES}, got '{symmetric_scale}'")
    if symmetric:
        absmax = torch.maximum(-xmin, xmax)
        levels = qmax if symmetric_scale == "qmax" else (qmax - qmin) / 2
        scale = torch.clamp(absmax / levels, min=eps)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((xmax - xmin) / (qmax - qmin), min=eps)
    zero_point = torch.clamp(torch.round(qmin - xmin / scale), qmin, qmax)
    return scale, zero_point


def round_ste(x: Tensor) -> Tensor:
    """Round half to even in the forward pass; identity gradient (straight-through estimator).

    `x` any shape -> the same shape and dtype. The result equals `torch.round(x)` exactly (the correction
    `round(x) - x` is exact in floats).
    """
    return x + (torch.round(x) - x).detach()


def broadcast_to_axis(param: Tensor, ndim: int, ch_axis: int | None) -> Tensor:
    """Reshape a per-channel `param` of shape `(C,)` to broadcast along `ch_axis` of an `ndim` tensor.

    `(C,)` -> `ndim` dims, `C` at `ch_axis` and 1 elsewhere (e.g. `(C, 1, 1, 1)` for a conv weight at
    `ch_axis=0`). A per-tensor `param` (`ch_axis=None`, shape `()`) is returned unchanged.
    """
    if ch_axis is None:
        return param
    axis = ch_axis % ndim
    shape = [1] * ndim
    shape[axis] = -1
    return param.reshape(shape)


def clamp_ste(code: Tensor, qmin: int, qmax: int) -> Tensor:
    """`clamp(code, qmin, qmax)` in the forward pass; gradient 1 where `qmin <= code <= qmax` (the grid ends
    included) and 0 where the value is clipped. `code` any shape -> the same shape and dtype.

    `torch.clamp` with scalar bounds passes gradient 0 *at* its bounds, which would stop the straight-through
    gradient of every value that rounds to qmin or qmax (most softmax probabilities at 4 bits round to 0).
    The forward value is `torch.clamp`'s exactly: codes are integer-valued, so `code + (clamp - code)` is exact.
    """
    clipped = torch.clamp(code, qmin, qmax)
    passed = code + (clipped - code).detach()  # gradient 1 everywhere
    inside = (code >= qmin) & (code <= qmax)
    return torch.where(inside, passed, clipped.detach())


def fake_quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, ch_axis: int | None = None
) -> Tensor:
    """Uniform affine fake quantization: `(clamp(round(x / s) + z, qmin, qmax) - z) * s`.

    Args:
        x: any shape.
        scale, zero_point: `()` per tensor (`ch_axis=None`), or `(C,)` with `C = x.shape[ch_axis]`,
            broadcast along `ch_axis` (`broadcast_to_axis`).
        qmin, qmax: the integer grid (see `integer_range`).
        ch_axis: channel axis of `x` for per-channel qparams, or None.

    Returns:
        Tensor of `x`'s shape and dtype. Gradients (those of `torch._fake_quantize_learnable_per_*_affine`,
        the LSQ+ op): straight-through w.r.t. `x` for every value whose rounded code lies in `[qmin, qmax]`,
        the ends included, and 0 where clipped (`clamp_ste`); w.r.t. `scale`, `round(x/s) - x/s` inside the
        grid and `qmin - z` / `qmax - z` where clipped below / above (the scale stays in the graph).
    """
    scale = broadcast_to_axis(scale, x.dim(), ch_axis)
    zero_point = broadcast_to_axis(zero_point, x.dim(), ch_axis)
    q = clamp_ste(round_ste(x * scale.reciprocal()) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).to(x.dtype)

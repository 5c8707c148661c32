"""The fused fake quantizer: quantize, straight-through gradient, LSQ scale gradient and QDrop mixing in one
autograd function.

`carsam.quant.primitives.fake_quantize` is the reference: it is written from differentiable pieces
(`round_ste`, `clamp_ste`), so autograd records about fifteen operations per call, keeps their intermediate
tensors and replays them backwards. At vit_b's shapes that made a fake-quant reconstruction step cost 1.87x its
FP step (forward + backward; issue 17). `fused_fake_quantize` is one autograd node: its forward makes about
half as many passes over the tensor (in place where it can) and keeps only the in-grid mask (plus `x` and
`q - z` when the scale or zero point is learned); its backward writes the chain rule out.

It is equal to the reference **bit for bit**, in the output and in the gradients with respect to `x`, `scale`
and `zero_point` (tested in `tests/quant/test_fused.py`): the forward does the same float arithmetic,
`(clamp(round(x * (1 / s)) + z, qmin, qmax) - z) * s`, and the backward does autograd's float operations in
autograd's order, e.g. `dL/dx = ((g * s) * inside) * (1 / s)`, which is not always `g * inside` in floats.
So a reconstruction with the fused quantizer follows the same trajectory as one without it.

PyTorch's own kernels (`fake_quantize_per_tensor_affine_cachemask`, `_fake_quantize_learnable_*_backward`) were
measured too: on this CPU they were slower than the eager ops (one kernel cost about seven multiplies), and the
learnable kernel's scale gradient differs from autograd's in the fifth digit; `torch.compile` of the forward
took 26 s to compile and was not faster here. See docs/results.md (issue 17).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from carsam.quant.primitives import broadcast_to_axis, fake_quantize


class _FusedFakeQuantize(torch.autograd.Function):
    """Forward and backward of `where(keep, fake_quantize(x, s, z), x)`, written out.

    Shapes: `x` any; `scale`, `zero_point` already broadcast to `x`'s rank (`()` or `(1, .., C, .., 1)`);
    `keep` None or a float 0/1 tensor of `x`'s shape (1: the quantized value). Masks are float and mixing is
    arithmetic (`out * keep + x * (1 - keep)`, exact for finite values), because on CPU `torch.where`,
    `masked_fill` and float-by-bool products cost several times a float product. The backward repeats the
    reference's float operations in the reference's order, so every gradient is bit-identical to autograd's
    through `fake_quantize`.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                keep: Tensor | None) -> Tensor:
        s, z = scale.detach(), zero_point.detach()
        code = torch.mul(x, s.reciprocal()).round_().add_(z)
        clipped = code.clamp(qmin, qmax)
        inside = code.eq_(clipped)  # 1.0 inside the grid (its ends included), 0.0 where clipped or NaN
        q_minus_z = clipped.sub_(z)
        out = q_minus_z * s
        if keep is not None:
            out = torch.addcmul(x * (1.0 - keep), out, keep)
        learns = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.save_for_backward(inside, keep, x if learns else None, q_minus_z if learns else None, s, z)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        inside, keep, x, q_minus_z, s, z = ctx.saved_tensors
        r = s.reciprocal()
        grad_q = grad if keep is None else grad * keep  # the gradient that reaches the quantized branch
        grad_qz = grad_q * s  # d out / d (q - z)
        grad_code = grad_qz * inside  # through clamp_ste: passed inside the grid, stopped where clipped
        grad_x = grad_scale = grad_zero = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_code * r  # d (x * r) / dx
            if keep is not None:  # a dropped element passed x through: gradient 1
                grad_x = torch.addcmul(grad_x, grad, 1.0 - keep)
        if ctx.needs_input_grad[1]:
            # out = (q - z) * s directly, and through r = 1 / s in x * r (reciprocal's backward: -r^2)
            direct = (grad_q * q_minus_z).sum_to_size(s.shape)
            through_r = (grad_code * x).sum_to_size(r.shape)
            grad_scale = direct + through_r * -(r * r)
        if ctx.needs_input_grad[2]:
            # + z in the code, - z after the clamp
            grad_zero = grad_code.sum_to_size(z.shape) + (-grad_qz).sum_to_size(z.shape)
        return grad_x, grad_scale, grad_zero, None, None, None


def fused_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                        ch_axis: int | None = None, keep: Tensor | None = None) -> Tensor:
    """`fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis)`, QDrop-mixed by `keep`, in one autograd node.

    Args:
        x: any shape and floating dtype (a 0-dim `x` takes the reference path).
        scale, zero_point: `()` per tensor, or `(C,)` along `ch_axis` with `C = x.shape[ch_axis]`; `scale`
            may be a learned parameter (LSQ), and its gradient is the reference's.
        qmin, qmax: the integer grid.
        ch_axis: channel axis for per-channel qparams, or None.
        keep: QDrop's mask of `x`'s shape, bool or 0/1 in `x`'s dtype (True / 1: the quantized value, else `x`),
            or None.

    Returns:
        A tensor of `x`'s shape and dtype, equal bit for bit to `torch.where(keep, fake_quantize(...), x)`.
    """
    if x.dim() == 0:
        x_q = fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis)
        return x_q if keep is None else torch.where(keep, x_q, x)
    scale_b = broadcast_to_axis(scale, x.dim(), ch_axis)
    keep_f = None if keep is None else keep.to(x.dtype)  # a float mask passes through without a copy
    out: Tensor = _FusedFakeQuantize.apply(x, scale_b, broadcast_to_axis(zero_point, x.dim(), ch_axis), qmin, qmax,
                                           keep_f)
    return out.to(x.dtype)


__all__ = ["fused_fake_quantize"]

"""The fused fake quantizer equals the reference composite (`fake_quantize` + QDrop's `torch.where`) bit for bit:
the output and the gradients with respect to x, scale and zero point; the reference's scale gradient is the LSQ+
formula."""

from __future__ import annotations

import pytest
import torch

from carsam.quant.fused import fused_fake_quantize
from carsam.quant.primitives import fake_quantize, integer_range, qparams_from_range
from carsam.quant.quantizers import UniformQuantizer

# (shape, ch_axis, bits, symmetric): an activation per tensor, a weight per output channel, a conv weight,
# a per-channel activation along its last axis.
CASES = [((3, 50, 16), None, 4, False), ((24, 40), 0, 4, True), ((8, 4, 3, 3), 0, 3, True),
         ((6, 10, 12), -1, 6, False), ((2, 7, 9), None, 2, True)]


def _case(shape, ch_axis, bits, symmetric, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2 + 0.3
    if ch_axis is None:
        lo, hi = x.min() * 0.7, x.max() * 0.6  # clip both ends: some codes land outside the grid
    else:
        dims = [d for d in range(x.dim()) if d != ch_axis % x.dim()]
        lo, hi = x.amin(dim=dims) * 0.7, x.amax(dim=dims) * 0.6
    scale, zero_point = qparams_from_range(lo, hi, bits, symmetric)
    qmin, qmax = integer_range(bits, symmetric)
    keep = torch.rand(shape, generator=gen) < 0.5
    return x, scale, zero_point, qmin, qmax, keep


def _grads(fn, x, scale, zero_point, qmin, qmax, ch_axis, keep, dtype=torch.float32):
    # fresh leaves per call, so that two calls never accumulate into one `.grad`
    x, scale, zero_point = (t.detach().to(dtype).clone().requires_grad_(True) for t in (x, scale, zero_point))
    out = fn(x, scale, zero_point, qmin, qmax, ch_axis, keep)
    weights = torch.linspace(-1.0, 2.0, out.numel(), dtype=dtype).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), x.grad, scale.grad, zero_point.grad


def _reference(x, scale, zero_point, qmin, qmax, ch_axis, keep):
    x_q = fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis)
    return x_q if keep is None else torch.where(keep, x_q, x)


@pytest.mark.parametrize("with_keep", [False, True], ids=["deterministic", "qdrop"])
@pytest.mark.parametrize(("shape", "ch_axis", "bits", "symmetric"), CASES)
def test_fused_equals_the_reference(shape, ch_axis, bits, symmetric, with_keep):
    x, scale, zp, qmin, qmax, keep = _case(shape, ch_axis, bits, symmetric)
    keep = keep if with_keep else None
    ref = _grads(_reference, x, scale, zp, qmin, qmax, ch_axis, keep)
    fused = _grads(fused_fake_quantize, x, scale, zp, qmin, qmax, ch_axis, keep)
    assert torch.equal(fused[0], ref[0]), "forward values differ"
    assert torch.equal(fused[1], ref[1]), "gradient w.r.t. x differs"
    assert torch.equal(fused[2], ref[2]), "gradient w.r.t. scale differs"
    assert torch.equal(fused[3], ref[3]), "gradient w.r.t. zero_point differs"


@pytest.mark.parametrize(("shape", "ch_axis", "bits", "symmetric"), CASES[:2])
def test_scale_gradient_is_the_lsq_formula_in_float64(shape, ch_axis, bits, symmetric):
    """The reference's (and so the fused) scale gradient is LSQ+'s: sum(g * (round(x/s) - x/s)) inside the grid and
    sum(g * (end - z)) where clipped, checked in float64 to 1e-10."""
    x, scale, zp, qmin, qmax, keep = _case(shape, ch_axis, bits, symmetric)
    ref = _grads(_reference, x, scale, zp, qmin, qmax, ch_axis, keep, dtype=torch.float64)
    x64, s64, z64 = x.double(), scale.double(), zp.double()
    dims = None if ch_axis is None else [d for d in range(x.dim()) if d != ch_axis % x.dim()]
    shape_b = [1] * x.dim() if ch_axis is not None else []
    if ch_axis is not None:
        shape_b[ch_axis % x.dim()] = -1
    s_b, z_b = (s64.reshape(shape_b), z64.reshape(shape_b)) if ch_axis is not None else (s64, z64)
    scaled = x64 / s_b
    code = torch.round(scaled) + z_b
    inside = (code >= qmin) & (code <= qmax)
    weights = torch.linspace(-1.0, 2.0, x.numel(), dtype=torch.float64).reshape(x.shape) * keep
    term = torch.where(inside, torch.round(scaled) - scaled, code.clamp(qmin, qmax) - z_b)
    expected = (weights * term).sum() if dims is None else (weights * term).sum(dim=dims)
    assert torch.allclose(ref[2], expected, rtol=1e-10, atol=1e-10)


def test_fused_is_one_autograd_node_and_exact_in_float64_too():
    x, scale, zp, qmin, qmax, keep = _case((4, 5, 6), -1, 4, False)
    leaf = x.clone().requires_grad_(True)
    out = fused_fake_quantize(leaf, scale, zp, qmin, qmax, -1, keep)
    assert type(out.grad_fn).__name__ == "_FusedFakeQuantizeBackward"
    ref = _grads(_reference, x, scale, zp, qmin, qmax, -1, keep, dtype=torch.float64)
    fused = _grads(fused_fake_quantize, x, scale, zp, qmin, qmax, -1, keep, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(fused, ref))


def test_a_learning_quantizer_gives_the_same_gradients_fused_or_not():
    """UniformQuantizer with a learned (LSQ) scale and QDrop in training mode: `fused = False` (the reference
    composite) and the default fused path give the same output and gradients for the same RNG state."""
    x = torch.randn(5, 30, generator=torch.Generator().manual_seed(2)) * 3
    results = []
    for fused in (False, True):
        q = UniformQuantizer(4)
        q.set_qparams(*qparams_from_range(x.min() * 0.5, x.max() * 0.5, 4, False))
        q.mode, q.quant_prob, q.fused = "quantized", 0.5, fused
        scale = q.make_scale_learnable()
        q.train()
        leaf = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        (q(leaf) * torch.arange(x.numel()).reshape(x.shape)).sum().backward()
        results.append((leaf.grad, scale.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_quantizer_qdrop_draw_is_the_same_as_before_fusion():
    """A QUANTIZED UniformQuantizer in training mode with quant_prob 0.5 draws one Bernoulli mask per element from
    the global RNG, as the unfused code did: the same seed gives the same mix of FP and quantized values."""
    q = UniformQuantizer(4, ch_axis=None)
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(1))
    q.set_qparams(*qparams_from_range(x.min(), x.max(), 4, False))
    q.mode, q.quant_prob = "quantized", 0.5
    q.train()
    torch.manual_seed(7)
    out = q(x)
    torch.manual_seed(7)
    keep = torch.rand_like(x, dtype=torch.float32) < 0.5
    expected = torch.where(keep, fake_quantize(x, q.scale, q.zero_point, q.qmin, q.qmax), x)
    assert torch.equal(out, expected) and 0 < int(keep.sum()) < x.numel()

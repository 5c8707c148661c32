"""Primitives: bit checks, integer ranges, qparams, STE rounding, fake quantization."""

from __future__ import annotations

import pytest
import torch

from carsam.quant.primitives import fake_quantize, integer_range, qparams_from_range, round_ste, validate_bits

BITS = (2, 3, 4, 8)


@pytest.mark.parametrize("bits", [1, 17, 0, -4, 3.5, "4", True, None])
def test_bits_out_of_range_raise_value_error(bits: object) -> None:
    with pytest.raises(ValueError, match="integer in 2..16"):
        validate_bits(bits)  # type: ignore[arg-type]


def test_valid_bits_are_returned_as_int() -> None:
    assert [validate_bits(b) for b in (2, 8, 16)] == [2, 8, 16]


def test_integer_range_asymmetric_and_symmetric() -> None:
    assert integer_range(4, symmetric=False) == (0, 15)
    assert integer_range(4, symmetric=True) == (-8, 7)
    assert integer_range(8, symmetric=True) == (-128, 127)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quantize_equals_torch_per_tensor(bits: int, symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(64, 33, generator=gen) * 3
    qmin, qmax = integer_range(bits, symmetric)
    scale, zp = qparams_from_range(x.min() * 0.8, x.max() * 0.7, bits, symmetric)
    ours = fake_quantize(x, scale, zp, qmin, qmax)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), qmin, qmax)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_fake_quantize_equals_torch_per_channel(bits: int, symmetric: bool, axis: int) -> None:
    gen = torch.Generator().manual_seed(100 + bits)
    x = torch.randn(6, 5, 7, generator=gen) * torch.rand(1, 5, 1, generator=gen) * 4
    dims = [d for d in range(3) if d != axis % 3]
    scale, zp = qparams_from_range(x.amin(dim=dims) * 0.9, x.amax(dim=dims), bits, symmetric)
    qmin, qmax = integer_range(bits, symmetric)
    ours = fake_quantize(x, scale, zp, qmin, qmax, ch_axis=axis)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp.to(torch.int32), axis % 3, qmin, qmax)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_range_endpoints_map_into_integer_range_and_zero_is_exact(bits: int, symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(bits)
    xmin = torch.cat([-torch.rand(6, generator=gen) * 5, torch.tensor([0.5, -0.2, 0.0])])
    xmax = torch.cat([torch.rand(6, generator=gen) * 5, torch.tensor([2.0, -0.1, 0.0])])  # ranges not holding 0
    scale, zp = qparams_from_range(xmin, xmax, bits, symmetric)
    qmin, qmax = integer_range(bits, symmetric)
    for end in (xmin, xmax):
        code = torch.round(end / scale) + zp
        assert bool(((code >= qmin) & (code <= qmax)).all())
    assert torch.equal(zp, torch.round(zp)) and bool(((zp >= qmin) & (zp <= qmax)).all())
    zeros = torch.zeros(len(xmin))
    assert torch.equal(fake_quantize(zeros, scale, zp, qmin, qmax, ch_axis=0), zeros)
    if symmetric:
        assert torch.equal(zp, torch.zeros_like(zp))


@pytest.mark.parametrize("bits", BITS)
def test_every_value_in_range_is_within_half_a_step_even_when_zero_point_is_a_tie(bits: int) -> None:
    # [-7, 7] on an odd number of steps puts the exact zero point at k + 0.5: one endpoint is then
    # half a step outside the grid, so its error is exactly half a step, like any rounding error.
    scale, zp = qparams_from_range(torch.tensor(-7.0), torch.tensor(7.0), bits, symmetric=False)
    x = torch.linspace(-7.0, 7.0, 1001)
    err = (fake_quantize(x, scale, zp, *integer_range(bits, False)) - x).abs()
    assert float(err.max()) <= float(scale) / 2 * (1 + 1e-5)


def test_round_ste_rounds_forward_and_passes_gradient_straight_through() -> None:
    x = torch.tensor([-1.5, -0.4, 0.5, 1.49, 2.5, 1e6 + 0.3], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_fake_quantize_gradients_ste_for_input_and_lsq_for_scale() -> None:
    x = torch.tensor([-10.0, -0.3, 0.2, 0.9, 10.0], requires_grad=True)
    scale = torch.tensor(0.1, requires_grad=True)
    zp = torch.tensor(8.0)
    fake_quantize(x, scale, zp, 0, 15).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0]))  # clipped elements get no gradient
    assert scale.grad is not None and float(scale.grad) != 0.0

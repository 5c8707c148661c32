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


def _grid_cases(axis: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values below, on and inside the ends of a 4-bit asymmetric grid (per tensor or per channel on axis 0),
    with their qparams."""
    gen = torch.Generator().manual_seed(3 if axis is None else 4)
    x = torch.randn(5, 48, generator=gen) * 3
    dims = None if axis is None else 1
    xmin = x.min() * 0.6 if axis is None else x.amin(dim=dims) * 0.6
    xmax = x.max() * 0.5 if axis is None else x.amax(dim=dims) * 0.5
    scale, zp = qparams_from_range(xmin, xmax, 4, symmetric=False)
    s = scale if axis is None else scale[:, None]
    z = zp if axis is None else zp[:, None]
    s, z = s.expand(5, 1)[:, 0], z.expand(5, 1)[:, 0]
    x[:, 0], x[:, 1] = (0 - z) * s, (15 - z) * s  # exactly on qmin and qmax
    return x, scale, zp


@pytest.mark.parametrize("axis", [None, 0])
def test_ste_passes_gradient_one_at_the_grid_ends_and_zero_where_clipped(axis: int | None) -> None:
    x, scale, zp = _grid_cases(axis)
    x = x.requires_grad_()
    fake_quantize(x, scale, zp, 0, 15, ch_axis=axis).sum().backward()
    s, z = (scale, zp) if axis is None else (scale[:, None], zp[:, None])
    code = torch.round(x.detach() * s.reciprocal()) + z
    inside = (code >= 0) & (code <= 15)
    assert bool(((code == 0) | (code == 15)).any()) and bool((~inside).any())  # the case is exercised
    assert torch.allclose(x.grad, inside.float(), rtol=1e-6, atol=0)  # 1 = s * (1/s) to the last bit or so
    assert torch.equal(x.grad[~inside], torch.zeros_like(x.grad[~inside]))


@pytest.mark.parametrize("axis", [None, 0])
def test_ste_and_scale_gradients_equal_torch_learnable_fake_quant(axis: int | None) -> None:
    x, scale, zp = _grid_cases(axis)
    weights = torch.linspace(-1.0, 2.0, x.numel()).reshape(x.shape)  # a non-uniform upstream gradient
    ours_x, ours_s = x.clone().requires_grad_(), scale.clone().requires_grad_()
    (fake_quantize(ours_x, ours_s, zp, 0, 15, ch_axis=axis) * weights).sum().backward()
    ref_x = x.clone().requires_grad_()
    if axis is None:
        ref_s = scale.reshape(1).clone().requires_grad_()
        ref = torch._fake_quantize_learnable_per_tensor_affine(ref_x, ref_s, zp.reshape(1), 0, 15, 1.0)
    else:
        ref_s = scale.clone().requires_grad_()
        ref = torch._fake_quantize_learnable_per_channel_affine(ref_x, ref_s, zp, axis, 0, 15, 1.0)
    (ref * weights).sum().backward()
    assert torch.equal(fake_quantize(x, scale, zp, 0, 15, ch_axis=axis), ref.detach())
    assert torch.allclose(ours_x.grad, ref_x.grad, rtol=1e-6, atol=1e-7)
    assert torch.allclose(ours_s.grad, ref_s.grad.reshape(ours_s.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_half_range_symmetric_scale_is_torchs_convention(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(1000, generator=gen) * 2 + 0.3
    scale, zp = qparams_from_range(x.min(), x.max(), bits, symmetric=True, symmetric_scale="half_range")
    qmin, qmax = integer_range(bits, symmetric=True)
    observer = torch.ao.quantization.MinMaxObserver(qscheme=torch.per_tensor_symmetric, dtype=torch.qint32,
                                                   quant_min=qmin, quant_max=qmax)
    observer(x)
    ref_scale, ref_zp = observer.calculate_qparams()
    absmax = torch.maximum(-x.min(), x.max())
    assert torch.allclose(scale, absmax / (2 ** (bits - 1) - 0.5), rtol=1e-7)
    assert torch.allclose(scale, ref_scale.reshape(()), rtol=1e-6) and int(zp) == int(ref_zp) == 0
    default, _ = qparams_from_range(x.min(), x.max(), bits, symmetric=True)
    assert torch.allclose(default, absmax / qmax, rtol=1e-7)  # the default stays absmax / qmax


def test_unknown_symmetric_scale_is_refused() -> None:
    with pytest.raises(ValueError, match="symmetric_scale must be one of"):
        qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), 4, symmetric=True, symmetric_scale="absmax")

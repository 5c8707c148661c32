"""AdaRound: initialisation, soft/hard rounding, regulariser, finalisation, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from carsam.quant.adaround import (
    AdaRoundQuantizer,
    adaround_modules,
    enable_adaround_,
    finalize_adaround_,
    rectified_sigmoid,
    set_soft_rounding,
)
from carsam.quant.modules import QuantConv2d, QuantLinear
from carsam.quant.quantizers import QuantMode, UniformQuantizer, iter_quantizers
from carsam.quant.state import set_quant_mode


def _calibrated_linear(observer: str = "mse", seed: int = 0) -> QuantLinear:
    """A 4-bit QuantLinear (16 -> 8) whose weight quantizer is calibrated; MSE clips some weights."""
    torch.manual_seed(seed)
    layer = QuantLinear.from_linear(nn.Linear(16, 8), UniformQuantizer(4, ch_axis=0, observer=observer),
                                    UniformQuantizer(8))
    layer.calibrate_weight()
    set_quant_mode(layer, QuantMode.QUANTIZED)
    return layer


def _grid_position(layer: QuantLinear | QuantConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """`w / s` (as AdaRound computes it) and whether `floor(w / s) + z` leaves room for +1 on the grid."""
    q = layer.weight_quantizer
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    s, z = q.scale.reshape(shape), q.zero_point.reshape(shape)
    ratio = layer.weight.detach() * s.reciprocal()
    inside = (torch.floor(ratio) + z >= q.qmin) & (torch.floor(ratio) + z + 1 <= q.qmax)
    return ratio, inside


def test_initial_soft_output_reproduces_the_weight_inside_the_grid() -> None:
    layer = _calibrated_linear()
    ratio, inside = _grid_position(layer)
    ada = enable_adaround_(layer)
    soft = ada(layer.weight).detach()
    assert inside.float().mean() > 0.8 and not bool(inside.all())  # MSE clipping: both cases present
    error_in_steps = ((soft - layer.weight.detach()) / ada.scale[:, None])[inside]
    assert float(error_in_steps.abs().max()) < 1e-5
    assert torch.allclose(ada.h(), ratio - torch.floor(ratio), atol=1e-6)


def test_soft_output_outside_the_grid_is_clamped_to_the_grid_end() -> None:
    layer = _calibrated_linear()
    _, inside = _grid_position(layer)
    expected = layer.weight_quantizer(layer.weight).detach()  # RTN: clamped to the grid ends there
    ada = enable_adaround_(layer)
    soft = ada(layer.weight).detach()
    outside = ~inside
    assert torch.allclose(soft[outside], expected[outside], atol=1e-6)


def test_hard_rounding_is_floor_or_floor_plus_one_only() -> None:
    layer = _calibrated_linear()
    ratio, inside = _grid_position(layer)
    ada = enable_adaround_(layer)
    with torch.no_grad():
        ada.alpha.normal_(0.0, 4.0, generator=torch.Generator().manual_seed(3))
    ada.soft = False
    codes = torch.round(ada(layer.weight).detach() / ada.scale[:, None])
    floor = torch.floor(ratio)
    assert bool(((codes == floor) | (codes == floor + 1))[inside].all())
    assert bool((codes == floor).any()) and bool((codes == floor + 1).any())


def test_hard_rounding_uses_h_at_least_one_half() -> None:
    layer = _calibrated_linear()
    ratio, inside = _grid_position(layer)
    ada = enable_adaround_(layer)
    ada.soft = False
    codes = torch.round(ada(layer.weight).detach() / ada.scale[:, None])
    up = (ada.h() >= 0.5).float()
    assert torch.equal(codes[inside], (torch.floor(ratio) + up)[inside])


def test_regularizer_is_zero_at_binary_h_and_maximal_at_one_half() -> None:
    ada = enable_adaround_(_calibrated_linear())
    with torch.no_grad():
        ada.alpha.fill_(10.0)  # h = 1 (rectified)
        assert float(ada.regularizer(2.0)) == 0.0
        ada.alpha.fill_(-10.0)  # h = 0
        assert float(ada.regularizer(20.0)) == 0.0
        ada.alpha.zero_()  # h = 0.5
        assert float(ada.regularizer(2.0)) == pytest.approx(ada.alpha.numel())
        peak = float(ada.regularizer(2.0))
        ada.alpha.normal_(generator=torch.Generator().manual_seed(1))
        assert float(ada.regularizer(2.0)) < peak


def test_rectified_sigmoid_reaches_exact_zero_and_one() -> None:
    h = rectified_sigmoid(torch.tensor([-20.0, 0.0, 20.0]))
    assert h.tolist() == [0.0, 0.5, 1.0]


def test_gradient_flows_to_alpha_only() -> None:
    layer = _calibrated_linear()
    ada = enable_adaround_(layer)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    layer.input_quantizer.mode = QuantMode.FP
    layer(x).square().sum().backward()
    assert ada.alpha.grad is not None and float(ada.alpha.grad.abs().sum()) > 0
    assert layer.weight.grad is None and layer.bias.grad is not None  # bias is a different leaf, not rounded
    assert [n for n, _ in ada.named_parameters()] == ["alpha"]


def test_finalize_leaves_no_adaround_and_weights_on_the_grid() -> None:
    layer = _calibrated_linear()
    original = layer.weight_quantizer
    ada = enable_adaround_(layer)
    with torch.no_grad():
        ada.alpha.normal_(generator=torch.Generator().manual_seed(4))
    hard = ada.rounded(layer.weight, soft=False).detach()
    model = nn.Sequential(layer)
    finalize_adaround_(model)
    assert adaround_modules(model) == [] and layer.weight_quantizer is original
    assert torch.equal(layer.weight.detach(), hard)
    assert torch.equal(original(layer.weight).detach(), layer.weight.detach())  # re-quantizing is exact


def test_finalize_bakes_conv_weights_that_requantize_exactly() -> None:
    torch.manual_seed(5)
    conv = QuantConv2d.from_conv2d(nn.Conv2d(3, 6, 3), UniformQuantizer(4, ch_axis=0, observer="mse"),
                                   nn.Identity())
    conv.calibrate_weight()
    set_quant_mode(conv, QuantMode.QUANTIZED)
    enable_adaround_(conv)
    finalize_adaround_(conv)
    assert isinstance(conv.weight_quantizer, UniformQuantizer)
    assert torch.equal(conv.weight_quantizer(conv.weight).detach(), conv.weight.detach())


def test_enable_requires_a_calibrated_uniform_weight_quantizer() -> None:
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(4, 3), UniformQuantizer(4, ch_axis=0), nn.Identity())
    with pytest.raises(ValueError, match="not calibrated"):
        enable_adaround_(layer)
    fp_weights = QuantLinear.from_linear(nn.Linear(4, 3), nn.Identity(), UniformQuantizer(8))
    with pytest.raises(ValueError, match="UniformQuantizer"):
        enable_adaround_(fp_weights)


def test_enable_is_idempotent_and_keeps_the_mode() -> None:
    layer = _calibrated_linear()
    ada = enable_adaround_(layer)
    assert enable_adaround_(layer) is ada and ada.mode is QuantMode.QUANTIZED


def test_iter_quantizers_sees_the_adaround_quantizer_once_and_mode_toggles_reach_it() -> None:
    layer = _calibrated_linear()
    ada = enable_adaround_(layer)
    found = dict(iter_quantizers(layer))
    assert found["weight_quantizer"] is ada and len(found) == 2
    set_quant_mode(layer, QuantMode.FP)
    assert ada(layer.weight) is layer.weight


def test_set_soft_rounding_switches_every_adaround_quantizer() -> None:
    model = nn.Sequential(_calibrated_linear(seed=0), _calibrated_linear(seed=1))
    for layer in model:
        enable_adaround_(layer)
    set_soft_rounding(model, False)
    assert [q.soft for _, q in adaround_modules(model)] == [False, False]


def test_adaround_quantizer_state_dict_holds_alpha_and_frozen_qparams() -> None:
    layer = _calibrated_linear()
    ada = AdaRoundQuantizer(layer.weight_quantizer, layer.weight)
    assert set(ada.state_dict()) == {"alpha", "scale", "zero_point"}
    assert torch.equal(ada.scale, layer.weight_quantizer.scale)

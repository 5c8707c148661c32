"""QuantLinear, QuantConv2d and QuantMatMul."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from carsam.quant.modules import QuantConv2d, QuantLinear, QuantMatMul
from carsam.quant.quantizers import QuantMode, UniformQuantizer
from carsam.quant.state import set_quant_mode


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(12, 6)


def _qlinear(linear: nn.Linear, observer: str = "minmax") -> QuantLinear:
    return QuantLinear.from_linear(linear, UniformQuantizer(4, ch_axis=0, observer=observer), UniformQuantizer(8))


def test_quant_linear_in_fp_mode_equals_linear_and_shares_parameters() -> None:
    linear = _linear()
    qlinear = _qlinear(linear)
    x = torch.randn(3, 5, 12)
    assert torch.equal(qlinear(x), linear(x))
    assert qlinear.weight is linear.weight and qlinear.bias is linear.bias


def test_quant_linear_state_dict_keys_extend_linear_keys() -> None:
    keys = set(_qlinear(_linear()).state_dict())
    assert {"weight", "bias"} <= keys and "weight_quantizer.scale" in keys and "input_quantizer.zero_point" in keys


def test_calibrate_weight_gives_per_output_channel_qparams_without_data() -> None:
    qlinear = _qlinear(_linear(), observer="mse")
    qlinear.calibrate_weight()
    qlinear.calibrate_weight()  # idempotent: replaces, does not accumulate
    assert qlinear.weight_quantizer.observer.num_batches == 1
    qlinear.weight_quantizer.finalize_calibration()
    assert qlinear.weight_quantizer.scale.shape == (6,)


def test_calibrate_mode_observes_the_weight_once_then_quantized_uses_it() -> None:
    linear = _linear()
    qlinear = _qlinear(linear)
    set_quant_mode(qlinear, QuantMode.CALIBRATE)
    x = torch.randn(7, 12)
    for _ in range(3):
        assert torch.equal(qlinear(x), linear(x))
    assert qlinear.weight_quantizer.observer.num_batches == 1
    set_quant_mode(qlinear, QuantMode.QUANTIZED)
    with torch.no_grad():
        out, ref = qlinear(x), linear(x)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.2


def test_quant_conv2d_in_fp_mode_equals_conv2d() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    qconv = QuantConv2d.from_conv2d(conv, UniformQuantizer(4, ch_axis=0), UniformQuantizer(4))
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(qconv(x), conv(x)) and set(conv.state_dict()) <= set(qconv.state_dict())
    qconv.calibrate_weight()
    set_quant_mode(qconv, "quantized")
    assert qconv.weight_quantizer.scale.shape == (6,)


def test_quant_conv2d_rejects_non_zero_padding_modes() -> None:
    with pytest.raises(ValueError, match="padding_mode"):
        QuantConv2d.from_conv2d(nn.Conv2d(2, 2, 3, padding_mode="reflect"), nn.Identity(), nn.Identity())


def test_quant_matmul_quantizes_both_operands_and_hooks_see_its_inputs() -> None:
    mm = QuantMatMul(UniformQuantizer(8), UniformQuantizer(8))
    gen = torch.Generator().manual_seed(2)
    lhs, rhs = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 5, 4, generator=gen)
    seen: list[tuple[torch.Tensor, ...]] = []
    mm.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs))
    assert torch.equal(mm(lhs, rhs), lhs @ rhs)
    assert seen[0][0] is lhs and seen[0][1] is rhs
    set_quant_mode(mm, "calibrate")
    mm(lhs, rhs)
    set_quant_mode(mm, "quantized")
    assert torch.allclose(mm(lhs, rhs), lhs @ rhs, atol=0.1) and not torch.equal(mm(lhs, rhs), lhs @ rhs)

"""FP references: a Parameter changed in place keeps its original for FP-mode passes."""

from __future__ import annotations

import copy

import torch

from carsam.quant.adaround import enable_adaround_, finalize_adaround_
from carsam.quant.fp_reference import fp_references, remember_fp_
from carsam.quant.modules import QuantLinear
from carsam.quant.quantizers import QuantMode, UniformQuantizer
from carsam.quant.state import fp_weights, quant_modes_set, set_quant_mode


def test_the_first_value_is_kept_swapped_in_and_back_and_stays_out_of_the_state_dict():
    linear = torch.nn.Linear(3, 2)
    original = linear.weight.detach().clone()
    assert remember_fp_(linear, "weight") and remember_fp_(linear, "bias")
    with torch.no_grad():
        linear.weight.add_(1.0)
    remember_fp_(linear, "weight")  # already kept: the original stays the reference
    with fp_weights(linear):
        assert torch.equal(linear.weight, original)
    assert torch.equal(linear.weight, original + 1.0)
    assert set(linear.state_dict()) == {"weight", "bias"} and len(fp_references(linear)) == 2
    clone = copy.deepcopy(linear)  # buffers travel with the module
    with fp_weights(clone):
        assert torch.equal(clone.weight, original)


def test_a_missing_bias_is_not_remembered():
    assert not remember_fp_(torch.nn.Linear(3, 2, bias=False), "bias")


def _calibrated_layer() -> QuantLinear:
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(8, 4), UniformQuantizer(4, ch_axis=0), torch.nn.Identity())
    set_quant_mode(layer, QuantMode.CALIBRATE)
    layer(torch.randn(5, 8))
    set_quant_mode(layer, QuantMode.QUANTIZED)
    return layer


def test_baked_adaround_weights_leave_the_fp_mode_output_unchanged():
    layer = _calibrated_layer()
    x = torch.randn(6, 8)
    with quant_modes_set(layer, QuantMode.FP), torch.no_grad():
        fp_before = layer(x)
    enable_adaround_(layer)
    finalize_adaround_(layer)
    with torch.no_grad():
        quantized = layer(x)
        with quant_modes_set(layer, QuantMode.FP):
            fp_after = layer(x)
    assert torch.equal(fp_after, fp_before) and not torch.equal(quantized, fp_before)
    with quant_modes_set(layer, None), torch.no_grad():  # other modes: the baked weight stays
        assert torch.equal(layer(x), quantized)

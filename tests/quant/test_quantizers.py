"""UniformQuantizer and the model-wide mode toggles."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from carsam.quant.primitives import fake_quantize
from carsam.quant.quantizers import QuantMode, UniformQuantizer, iter_quantizers
from carsam.quant.state import assert_quant_mode, quant_modes, set_quant_mode


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(seed))


def _model() -> nn.Module:
    return nn.ModuleDict({"a": UniformQuantizer(8), "b": nn.Sequential(nn.ReLU(), UniformQuantizer(4, ch_axis=-1))})


def test_fp_mode_is_identity_and_calibrate_mode_observes_but_passes_through() -> None:
    q, x = UniformQuantizer(4), _x()
    assert q(x) is x and not q.observer.has_data
    q.mode = "calibrate"
    assert q(x) is x and q.observer.has_data


def test_quantized_mode_without_calibration_raises_naming_the_quantizer() -> None:
    model = _model()
    set_quant_mode(model, QuantMode.QUANTIZED)
    with pytest.raises(RuntimeError, match="'b.1'.*never calibrated"):
        model["b"](_x())


def test_calibrate_then_quantized_finalizes_qparams_per_tensor_and_per_channel() -> None:
    model, x = _model(), _x()
    set_quant_mode(model, "calibrate")
    model["a"](x)
    model["b"](x)
    set_quant_mode(model, "quantized")
    qa, qb = model["a"], model["b"][1]
    assert qa.is_calibrated and qa.scale.shape == () and qb.scale.shape == (16,)
    assert not qa.observer.has_data  # finalized observers are reset
    assert torch.equal(qb(x), fake_quantize(x, qb.scale, qb.zero_point, 0, 15, ch_axis=-1))


def test_qparams_are_buffers_in_state_dict_and_load_into_a_fresh_quantizer() -> None:
    q = UniformQuantizer(4, ch_axis=0)
    q.set_qparams(torch.tensor([0.1, 0.2]), torch.tensor([3.0, 7.0]))
    fresh = UniformQuantizer(4, ch_axis=0)
    assert set(fresh.state_dict()) == {"scale", "zero_point"} and not fresh.is_calibrated
    fresh.load_state_dict(q.state_dict())
    assert fresh.is_calibrated and torch.equal(fresh.zero_point, q.zero_point)


def test_set_qparams_rejects_shapes_that_do_not_fit_the_granularity() -> None:
    with pytest.raises(ValueError, match="ch_axis=None"):
        UniformQuantizer(4).set_qparams(torch.ones(3), torch.zeros(3))


def test_make_scale_learnable_keeps_key_and_gets_lsq_gradient() -> None:
    q = UniformQuantizer(4)
    q.set_qparams(torch.tensor(0.3), torch.tensor(8.0))
    q.mode = QuantMode.QUANTIZED
    scale = q.make_scale_learnable()
    assert isinstance(scale, nn.Parameter) and "scale" in dict(q.named_parameters())
    assert set(q.state_dict()) == {"scale", "zero_point"}
    q(_x()).sum().backward()
    assert scale.grad is not None and float(scale.grad.abs()) > 0
    q.set_qparams(torch.tensor(0.5), torch.tensor(8.0))  # still settable after conversion
    assert q.scale is scale and float(scale.detach()) == 0.5


def test_quantizer_with_observed_data_deep_copies() -> None:
    q = UniformQuantizer(4, observer="mse")
    q.mode = "calibrate"
    q(_x())
    clone = copy.deepcopy(q)
    q.finalize_calibration()
    clone.finalize_calibration()
    assert torch.equal(q.scale, clone.scale)


def test_assert_quant_mode_raises_listing_the_odd_quantizer_out() -> None:
    model = _model()
    set_quant_mode(model, "fp")
    assert_quant_mode(model, "fp")
    model["b"][1].mode = QuantMode.CALIBRATE
    with pytest.raises(AssertionError, match=r"1 quantizer\(s\).*'b\.1': 'calibrate'"):
        assert_quant_mode(model, QuantMode.FP)


def test_quant_modes_and_iter_quantizers_report_module_paths() -> None:
    model = _model()
    assert [p for p, _ in iter_quantizers(model)] == ["a", "b.1"]
    assert quant_modes(model) == {"a": QuantMode.FP, "b.1": QuantMode.FP}


def test_unknown_mode_raises() -> None:
    with pytest.raises(ValueError):
        set_quant_mode(_model(), "drop")


def test_extra_repr_shows_bits_symmetry_granularity_and_mode() -> None:
    text = repr(UniformQuantizer(4, symmetric=True, ch_axis=0))
    assert "bits=4" in text and "sym" in text and "per_channel(axis=0)" in text and "mode=fp" in text


@pytest.mark.filterwarnings("ignore:for .*meta parameter.*:UserWarning")  # copying into meta is a no-op, expected
def test_loading_qparams_into_an_uncalibrated_quantizer_keeps_its_device():
    """A CPU state dict (a cache entry, a checkpoint) loaded into a quantizer on another device lands on that
    device, not on the CPU (checked with `meta`, which any machine has, standing in for CUDA)."""
    source = UniformQuantizer(4, ch_axis=0)
    source.set_qparams(torch.full((3,), 0.1), torch.zeros(3))
    target = UniformQuantizer(4, ch_axis=0).to("meta")
    target.load_state_dict(source.state_dict())
    assert target.scale.device.type == "meta" and target.zero_point.device.type == "meta"
    assert target.scale.shape == (3,)

"""QDrop's quant_prob on the quantizers, set_quant_prob, and assert_eval_ready."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from carsam.quant.adaround import enable_adaround_
from carsam.quant.logquant import LogQuantizer
from carsam.quant.modules import QuantLinear
from carsam.quant.quantizers import QuantMode, UniformQuantizer
from carsam.quant.state import assert_eval_ready, set_quant_mode, set_quant_prob


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))


def _quantizer(p: float = 1.0) -> UniformQuantizer:
    q = UniformQuantizer(4)
    q.set_qparams(torch.tensor(0.4), torch.tensor(8.0))
    q.mode = QuantMode.QUANTIZED
    q.quant_prob = p
    return q


def _model() -> nn.Module:
    """Two calibrated QuantLinears (weights + inputs) in QUANTIZED mode."""
    torch.manual_seed(0)
    layers = nn.Sequential(*(QuantLinear.from_linear(nn.Linear(8, 8), UniformQuantizer(4, ch_axis=0),
                                                     UniformQuantizer(8)) for _ in range(2)))
    set_quant_mode(layers, QuantMode.CALIBRATE)
    layers(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)))
    set_quant_mode(layers, QuantMode.QUANTIZED)
    return layers


def test_half_drop_mixes_fp_and_quantized_elements_in_train_mode() -> None:
    q, x = _quantizer(0.5).train(), _x()
    x_q = _quantizer()(x)
    torch.manual_seed(0)
    out = q(x)
    kept_q, kept_fp = out == x_q, out == x
    assert bool((kept_q | kept_fp).all())
    share = float((kept_q & ~kept_fp).float().sum() / (x != x_q).float().sum())
    assert 0.45 < share < 0.55


def test_quant_prob_one_is_deterministic_in_train_mode() -> None:
    q, x = _quantizer(1.0).train(), _x()
    torch.manual_seed(0)
    first = q(x)
    torch.manual_seed(1)
    assert torch.equal(first, q(x))


def test_eval_mode_ignores_quant_prob() -> None:
    q, x = _quantizer(0.5).eval(), _x()
    assert torch.equal(q(x), _quantizer()(x))


def test_drop_is_seeded() -> None:
    q, x = _quantizer(0.5).train(), _x()
    torch.manual_seed(3)
    first = q(x)
    torch.manual_seed(3)
    assert torch.equal(first, q(x))


def test_log_quantizer_drops_too() -> None:
    q = LogQuantizer(4, tau=1)
    q.mode, q.quant_prob = QuantMode.QUANTIZED, 0.5
    p = torch.softmax(_x(), dim=-1)
    torch.manual_seed(0)
    out = q.train()(p)
    assert bool((out == p).any()) and bool((out == q.eval()(p)).any())


def test_quant_prob_outside_unit_interval_raises() -> None:
    with pytest.raises(ValueError, match="quant_prob"):
        _quantizer().quant_prob = 1.5
    with pytest.raises(ValueError, match="quant_prob"):
        set_quant_prob(_model(), -0.1)


def test_set_quant_prob_below_one_skips_weight_quantizers() -> None:
    model = _model()
    set_quant_prob(model, 0.5)
    assert [layer.input_quantizer.quant_prob for layer in model] == [0.5, 0.5]
    assert [layer.weight_quantizer.quant_prob for layer in model] == [1.0, 1.0]
    set_quant_prob(model, 0.5, weights=True)
    assert [layer.weight_quantizer.quant_prob for layer in model] == [0.5, 0.5]


def test_set_quant_prob_one_resets_every_quantizer() -> None:
    model = _model()
    set_quant_prob(model, 0.5, weights=True)
    set_quant_prob(model, 1.0)
    assert_eval_ready(model)


def test_drop_prob_is_one_at_eval_or_assert_eval_ready_names_the_offender() -> None:
    model = _model()
    set_quant_prob(model, 0.5)
    set_quant_prob(model[0], 1.0)  # the PTQ4SAM bug: only some quantizers reset
    with pytest.raises(AssertionError, match=r"1 quantizer\(s\).*'1\.input_quantizer': quant_prob=0\.5"):
        assert_eval_ready(model)


def test_assert_eval_ready_catches_fp_mode_and_uncalibrated_quantizers() -> None:
    model = _model()
    model[0].input_quantizer.mode = QuantMode.FP
    model.append(QuantLinear.from_linear(nn.Linear(8, 8), nn.Identity(), UniformQuantizer(8)))
    model[2].input_quantizer.mode = QuantMode.QUANTIZED
    with pytest.raises(AssertionError, match=r"2 quantizer\(s\).*'0\.input_quantizer': mode=fp.*'2\.input_quantizer': "
                                             r"uncalibrated"):
        assert_eval_ready(model)


def test_assert_eval_ready_catches_adaround_left_in_soft_mode() -> None:
    model = _model()
    ada = enable_adaround_(model[1])
    with pytest.raises(AssertionError, match=r"'1\.weight_quantizer': soft rounding"):
        assert_eval_ready(model)
    ada.soft = False
    assert_eval_ready(model)


def test_extra_repr_shows_quant_prob_only_when_dropping() -> None:
    assert "quant_prob" not in repr(_quantizer(1.0)) and "quant_prob=0.5" in repr(_quantizer(0.5))

"""Losses and schedules against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from carsam.quant.adaround import AdaRoundQuantizer, inverse_rectified_sigmoid
from carsam.quant.quantizers import QuantMode, UniformQuantizer
from carsam.recon.losses import lp_error, rounding_regularizer, stream_losses, weighted_sum
from carsam.recon.schedules import RoundingSchedule, cosine_factor

PRED = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (1, 2, 2)


def test_lp_error_mean_and_qdrop_reductions():
    zeros = torch.zeros_like(PRED)
    assert lp_error(PRED, zeros).item() == pytest.approx(30 / 4)  # (1 + 4 + 9 + 16) / 4
    assert lp_error(PRED, zeros, p=1.0).item() == pytest.approx(10 / 4)
    assert lp_error(PRED, zeros, reduction="qdrop").item() == pytest.approx((10 + 20) / 2)  # sum dim 1: [10, 20]
    with pytest.raises(ValueError, match="shape"):
        lp_error(PRED, zeros[:, :1])


def test_stream_losses_are_per_stream_and_weightable():
    losses = stream_losses([PRED, 2 * PRED], [PRED, PRED], ["queries", "keys"])
    assert list(losses) == ["queries", "keys"]
    assert losses["queries"].item() == 0.0 and losses["keys"].item() == pytest.approx(7.5)
    assert weighted_sum(losses, {"keys": 0.1}).item() == pytest.approx(0.75)
    assert weighted_sum(losses).item() == pytest.approx(7.5)
    with pytest.raises(ValueError, match="unknown streams"):
        weighted_sum(losses, {"image": 1.0})


def test_beta_is_constant_in_warmup_then_linear_from_20_to_2():
    s = RoundingSchedule(total=100)
    assert s.warmup_steps == 20
    assert [s.beta(t) for t in (0, 20, 60, 100)] == pytest.approx([20.0, 20.0, 11.0, 2.0])
    assert s.weight_at(19) == 0.0 and s.weight_at(20) == 0.01 and s.weight_at(99) == 0.01


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError):
        RoundingSchedule(total=0)
    with pytest.raises(ValueError):
        RoundingSchedule(total=10, warmup=1.0)


def test_cosine_factor_known_points():
    assert [cosine_factor(t, 100) for t in (0, 50, 100, 150)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert cosine_factor(25, 100) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert cosine_factor(100, 100, final=0.1) == pytest.approx(0.1)


def _adaround_with_h(h: float) -> AdaRoundQuantizer:
    q = UniformQuantizer(4, ch_axis=0)
    q.set_qparams(torch.ones(2), torch.zeros(2))
    q.mode = QuantMode.QUANTIZED
    ada = AdaRoundQuantizer(q, torch.full((2, 3), 2.0))
    with torch.no_grad():
        ada.alpha.copy_(inverse_rectified_sigmoid(torch.full((2, 3), h)))
    return ada


def test_rounding_regularizer_hand_values():
    # h = 0.75: 1 - |2 * 0.75 - 1|^2 = 0.75 per element, 6 elements, two quantizers
    reg = rounding_regularizer([_adaround_with_h(0.75), _adaround_with_h(0.75)], beta=2.0)
    assert reg.item() == pytest.approx(2 * 6 * 0.75, rel=1e-5)
    assert rounding_regularizer([_adaround_with_h(0.5)], beta=20.0).item() == pytest.approx(6.0, rel=1e-5)
    assert rounding_regularizer([], beta=2.0).item() == 0.0
    assert isinstance(_adaround_with_h(0.5).alpha, nn.Parameter)

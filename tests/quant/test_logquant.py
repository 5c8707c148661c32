"""AGQ's log quantizer: levels, the hand-computed 4-bit table, modes, state dict, and search_tau."""

from __future__ import annotations

import pytest
import torch

from carsam.quant.logquant import LogQuantizer, log_fake_quantize, log_levels, search_tau
from carsam.quant.quantizers import QuantMode, iter_quantizers
from carsam.quant.state import quant_modes, set_quant_mode


def _probs(seed: int = 0, rows: int = 16, keys: int = 64) -> torch.Tensor:
    logits = 3.0 * torch.randn(rows, keys, generator=torch.Generator().manual_seed(seed))
    return torch.softmax(logits, dim=-1)


def _quantized(bits: int = 4, tau: int = 2, scale: float | None = 1.0) -> LogQuantizer:
    q = LogQuantizer(bits, tau, scale)
    q.mode = QuantMode.QUANTIZED
    return q


@pytest.mark.parametrize("tau", [1, 2, 4])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_dequantized_values_are_powers_of_the_base_times_scale_or_zero(tau: int, scale: float) -> None:
    out = log_fake_quantize(_probs() * scale, 4, tau, scale)
    levels = log_levels(4, tau, scale)
    assert bool(torch.isin(out, levels).all())
    expected = [0.0] + [scale * 2.0 ** (-k / tau) for k in range(15, -1, -1)]
    assert levels.tolist() == pytest.approx(expected, rel=1e-6)


def test_tau_one_four_bits_matches_the_hand_computed_table() -> None:
    p = torch.tensor([1.0, 0.75, 0.7, 0.5, 0.3, 0.25, 1e-4, 2**-15, 2**-15.4, 2**-15.6, 2**-16, 0.0, 1.3])
    # codes: round(-log2 p) = 0, 0 (0.415), 1 (0.515), 1, 2 (1.737), 2, 13 (13.29), 15, 15, 16 -> 0,
    # 16 -> 0, inf -> 0, -0.38 -> clamp 0
    expected = [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 2**-13, 2**-15, 2**-15, 0.0, 0.0, 0.0, 1.0]
    assert log_fake_quantize(p, 4, 1).tolist() == expected


def test_tau_two_halves_the_step_in_log_space() -> None:
    p = torch.tensor([2**-0.5, 2**-3.5, 2**-7.5, 2**-7.9])
    assert log_fake_quantize(p, 4, 2).tolist() == pytest.approx([2**-0.5, 2**-3.5, 2**-7.5, 0.0], rel=1e-6)


def test_quantizer_modes_fp_identity_calibrate_learns_max_quantized_rounds() -> None:
    q, p = LogQuantizer(4, tau=1, scale=None), _probs()
    assert q(p) is p and not q.is_calibrated
    set_quant_mode(q, QuantMode.CALIBRATE)
    assert q(p) is p
    set_quant_mode(q, QuantMode.QUANTIZED)
    assert float(q.scale) == float(p.max())
    assert bool(torch.isin(q(p), log_levels(4, 1, float(p.max()))).all())


def test_fixed_scale_quantizer_is_calibrated_and_does_not_observe() -> None:
    q = LogQuantizer(4, tau=2)
    set_quant_mode(q, QuantMode.CALIBRATE)
    q(_probs())
    assert q.is_calibrated and not q.has_pending_calibration and float(q.scale) == 1.0


def test_quantized_without_scale_raises_naming_the_quantizer() -> None:
    q = _quantized(scale=None)
    with pytest.raises(RuntimeError, match="without a scale"):
        q(_probs())


def test_straight_through_gradient_and_exact_forward() -> None:
    q, p = _quantized(tau=4), _probs().requires_grad_(True)
    out = q(p)
    assert torch.equal(out.detach(), log_fake_quantize(p.detach(), 4, 4))
    out.sum().backward()
    assert torch.equal(p.grad, torch.ones_like(p))


def test_iter_quantizers_and_set_quant_mode_treat_it_like_any_quantizer() -> None:
    model = torch.nn.ModuleDict({"probs": LogQuantizer(4)})
    set_quant_mode(model, "quantized")
    assert [p for p, _ in iter_quantizers(model)] == ["probs"] and quant_modes(model) == {"probs": QuantMode.QUANTIZED}


def test_state_dict_carries_scale_and_tau_into_a_fresh_quantizer() -> None:
    q = _quantized(tau=4, scale=None)
    q.scale = torch.tensor(0.8)
    fresh = LogQuantizer(4, tau=1, scale=None)
    fresh.load_state_dict(q.state_dict())
    assert fresh.tau == 4 and float(fresh.scale) == pytest.approx(0.8)


def test_invalid_tau_raises() -> None:
    with pytest.raises(ValueError, match="tau"):
        LogQuantizer(4, tau=3)
    with pytest.raises(ValueError, match="tau"):
        LogQuantizer(4).set_tau(8)


def _values(keys: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(keys, 8, generator=torch.Generator().manual_seed(seed))


def test_search_tau_picks_one_for_a_long_flat_tail() -> None:
    probs = torch.full((4, 1000), 1e-3)  # 2^-9.97: only tau = 1 reaches it at 4 bits
    assert search_tau(probs, _values(1000), bits=4) == 1


def test_search_tau_picks_two_for_half_integer_exponents() -> None:
    exps = torch.tensor([0.5, 1.5, 2.5, 3.5, 5.5, 6.5])  # exact at tau = 2; tau = 1 rounds; tau = 4 too short
    probs = torch.exp2(-exps).repeat(3, 1)
    assert search_tau(probs, _values(6), bits=4) == 2


def test_search_tau_picks_four_for_peaked_rows() -> None:
    exps = torch.arange(1, 13) / 4  # 2^(-k/4), k = 1..12: exact only at tau = 4
    probs = torch.exp2(-exps).repeat(3, 1)
    assert search_tau(probs, _values(12), bits=4) == 4


def test_search_tau_respects_the_candidates_and_breaks_ties_to_the_first() -> None:
    probs = torch.tensor([[1.0, 0.5, 0.25]])  # exact for every tau
    assert search_tau(probs, _values(3), bits=4, taus=(4, 2)) == 4
    with pytest.raises(ValueError):
        search_tau(probs, _values(3), bits=4, taus=())

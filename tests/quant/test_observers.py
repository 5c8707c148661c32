"""Observers: min/max, percentile and MSE range estimators, and the registry."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from carsam.quant import observers
from carsam.quant.observers import MinMaxObserver, MSEObserver, PercentileObserver, build_observer


def _batches(seed: int, n: int = 3, shape: tuple[int, ...] = (4, 6, 10)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) * (i + 1) for i in range(n)]


def test_minmax_per_tensor_on_known_data() -> None:
    obs = MinMaxObserver()
    obs.observe(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    obs.observe(torch.tensor([-0.5, 4.0]))
    xmin, xmax = obs.compute_range()
    assert xmin.shape == () and (float(xmin), float(xmax)) == (-2.0, 4.0)


def test_minmax_per_channel_reduces_over_all_other_axes() -> None:
    batches = _batches(0)
    obs = MinMaxObserver(ch_axis=1)
    for b in batches:
        obs.observe(b)
    stacked = torch.cat(batches).movedim(1, 0).reshape(6, -1)
    xmin, xmax = obs.compute_range()
    assert torch.equal(xmin, stacked.amin(1)) and torch.equal(xmax, stacked.amax(1))


@pytest.mark.parametrize("ch_axis", [None, 2])
def test_percentile_matches_torch_quantile_averaged_over_batches(ch_axis: int | None) -> None:
    batches = _batches(1)
    obs = PercentileObserver(percentile=99.0, ch_axis=ch_axis)
    for b in batches:
        obs.observe(b)
    rows = [b.reshape(1, -1) if ch_axis is None else b.movedim(ch_axis, 0).reshape(b.shape[ch_axis], -1)
            for b in batches]
    lows = torch.stack([torch.quantile(r, 0.01, dim=1) for r in rows]).mean(0)
    highs = torch.stack([torch.quantile(r, 0.99, dim=1) for r in rows]).mean(0)
    xmin, xmax = obs.compute_range()
    assert torch.allclose(xmin.reshape(-1), lows, atol=1e-6) and torch.allclose(xmax.reshape(-1), highs, atol=1e-6)


def test_percentile_subsamples_huge_tensors_deterministically(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observers, "QUANTILE_MAX_ELEMENTS", 1000)  # stands in for 2^24
    x = torch.randn(20000, generator=torch.Generator().manual_seed(2))
    ranges = []
    for _ in range(2):
        obs = PercentileObserver(percentile=99.0)
        obs.observe(x)
        ranges.append(obs.compute_range())
    assert torch.equal(ranges[0][0], ranges[1][0]) and torch.equal(ranges[0][1], ranges[1][1])
    assert abs(float(ranges[0][1]) - float(torch.quantile(x, 0.99))) < 0.3


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_search_error_is_at_most_minmax_error(bits: int, symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 64, generator=gen)
    w[:, 0] *= 12  # outliers make clipping worthwhile
    mse = MSEObserver(bits, symmetric, ch_axis=0, grid=50)
    minmax = MinMaxObserver(ch_axis=0)
    mse.observe(w)
    minmax.observe(w)
    err_mse = mse.error(w, *mse.compute_range())
    err_minmax = mse.error(w, *minmax.compute_range())
    assert bool((err_mse <= err_minmax).all())
    if bits <= 4:
        assert bool((err_mse < err_minmax).any())


def test_mse_accumulates_activations_in_a_bounded_deterministic_sample() -> None:
    def run() -> tuple[torch.Tensor, torch.Tensor, int]:
        obs = MSEObserver(4, max_samples=100)
        for b in _batches(3):
            obs.observe(b)
        assert obs.sample is not None
        return (*obs.compute_range(), obs.sample.shape[1])

    first, second = run(), run()
    assert first[2] <= 100 and torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_mse_keeps_all_values_when_they_fit() -> None:
    obs = MSEObserver(4)
    batches = _batches(4, n=2)
    for b in batches:
        obs.observe(b)
    assert obs.sample is not None and torch.equal(obs.sample, torch.cat([b.reshape(1, -1) for b in batches], 1))


def test_mse_sample_does_not_alias_the_observed_tensor() -> None:
    w = torch.ones(4, 8)
    obs = MSEObserver(4, ch_axis=0)
    obs.observe(w)
    w.mul_(100)  # e.g. a weight edited in place after calibrate_weight
    assert float(obs.compute_range()[1].max()) == 1.0


def test_observers_do_not_touch_the_global_rng() -> None:
    state = torch.get_rng_state()
    obs = MSEObserver(4, max_samples=10)
    for b in _batches(5):
        obs.observe(b)
    obs.compute_range()
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", ["minmax", "percentile", "mse"])
def test_observers_with_data_survive_deepcopy_and_pickle(name: str) -> None:
    obs = build_observer(name, **({"bits": 4} if name == "mse" else {}))
    obs.observe(torch.randn(8, 8, generator=torch.Generator().manual_seed(6)))
    for clone in (copy.deepcopy(obs), pickle.loads(pickle.dumps(obs))):
        assert all(torch.equal(a, b) for a, b in zip(clone.compute_range(), obs.compute_range()))


def test_compute_range_before_observe_raises_and_reset_forgets() -> None:
    obs = MinMaxObserver()
    with pytest.raises(RuntimeError, match="before any observe"):
        obs.compute_range()
    obs.observe(torch.ones(3))
    obs.reset()
    assert not obs.has_data


def test_unknown_observer_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"\['minmax', 'mse', 'percentile'\]"):
        build_observer("omse")

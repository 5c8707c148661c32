"""Oscillation indices and interference on curves and entries with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from carsam.diagnostics.oscillation import (
    curve_steps,
    interference,
    interference_frame,
    interference_series,
    oscillation_frame,
    oscillation_index,
    slope_sign_changes,
)


def _alternating(n: int) -> list[float]:
    """10, 0.1, 10, 0.1, ...: log10 alternates +1, -1."""
    return [10.0 if t % 2 == 0 else 0.1 for t in range(n)]


def test_exponential_decay_has_zero_oscillation_and_no_sign_change():
    curve = (3.0 * np.exp(-0.05 * np.arange(200))).tolist()
    assert oscillation_index(curve, window=5) == pytest.approx(0.0, abs=1e-12)
    assert slope_sign_changes(curve, window=5) == 0.0


def test_alternating_curve_has_the_hand_computed_index():
    curve = _alternating(20)
    # window 1: second differences of +1, -1, +1 are +-4
    assert oscillation_index(curve, window=1) == pytest.approx(4.0)
    # window 3: the moving average alternates +-1/3, second differences +-4/3
    assert oscillation_index(curve, window=3) == pytest.approx(4.0 / 3.0)
    # window 2: the moving average is flat
    assert oscillation_index(curve, window=2) == pytest.approx(0.0)
    assert slope_sign_changes(curve, window=1) == 100.0


def test_one_sign_change_is_counted_per_hundred_steps():
    curve = [10.0 ** -(t if t <= 10 else 20 - t) for t in range(21)]  # down for 10 steps, then up for 10
    # 20 slopes, 19 consecutive pairs, 1 change
    assert slope_sign_changes(curve, window=1) == pytest.approx(100.0 / 19)


def test_too_short_curves_give_nan_and_bad_windows_raise():
    assert math.isnan(oscillation_index([1.0, 0.5], window=1))
    assert math.isnan(slope_sign_changes([1.0, 0.5, 0.2], window=2))
    with pytest.raises(ValueError, match="window"):
        oscillation_index([1.0, 2.0, 3.0], window=0)


def _entries() -> list[dict]:
    errs = lambda a, b, c, d: {"layers.0.self_attn": {"queries": a, "keys": b},  # noqa: E731
                               "layers.0.mlp": {"queries": c, "keys": d}}
    return [{"after": "start", "errors": errs(1.0, 0.0, 2.0, 0.5)},
            {"after": "unit.a", "errors": errs(0.5, 0.0, 2.5, 0.5)},
            {"after": "unit.b", "errors": errs(0.9, 0.2, 1.0, 0.7)}]


def test_interference_is_the_mean_positive_rise_per_stream():
    before, after = _entries()[1]["errors"], _entries()[2]["errors"]
    assert interference(before, after) == pytest.approx({"queries": (0.4 + 0.0) / 2, "keys": (0.2 + 0.2) / 2})
    assert interference(before, after, ["layers.0.mlp"]) == pytest.approx({"queries": 0.0, "keys": 0.2})
    with pytest.raises(KeyError):
        interference(before, after, ["layers.1.mlp"])


def test_interference_series_scores_only_boundaries_already_reconstructed():
    reconstructed = {"unit.a": ["layers.0.self_attn"], "unit.b": ["layers.0.mlp"]}
    series = interference_series(_entries(), reconstructed)
    assert [r["after"] for r in series] == ["unit.a", "unit.b"]
    assert all(math.isnan(v) for v in series[0]["rise"].values())  # nothing reconstructed before unit.a
    assert series[1]["rise"] == pytest.approx({"queries": 0.4, "keys": 0.2})
    unrestricted = interference_series(_entries())
    assert unrestricted[0]["rise"] == pytest.approx({"queries": 0.25, "keys": 0.0})


def test_frames_are_long_format_with_real_steps():
    units = [{"unit": "decoder.layers.0.self_attn", "steps": 100, "curve": {"out": [1.0, 0.5, 0.25, 0.125, 0.0625],
                                                                            "total": [1.0, 0.6, 0.3, 0.2, 0.1]}}]
    frame = oscillation_frame(units, window=1)
    loss = frame[frame["kind"] == "loss/out"]
    assert loss["step"].tolist() == [0, 25, 50, 74, 99] == curve_steps(5, 100).tolist()
    index = frame.loc[frame["kind"] == "oscillation_index/out", "value"].item()
    assert index == pytest.approx(0.0, abs=1e-12)
    assert set(frame["kind"]) == {"loss/out", "loss/total", "oscillation_index/out", "oscillation_index/total",
                                  "slope_sign_changes/out", "slope_sign_changes/total"}
    inter = interference_frame(_entries())
    assert len(inter[inter["kind"].str.startswith("boundary_error/")]) == 3 * 2 * 2
    assert inter.loc[(inter["kind"] == "interference/queries") & (inter["module"] == "unit.b"), "step"].item() == 2
    assert (frame[["layer", "head"]] == -1).all().all()

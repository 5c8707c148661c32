"""diagnostics.parquet: atomic long-format round trip and the diag/* summary metrics."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from carsam.diagnostics.oscillation import interference_frame, oscillation_frame
from carsam.diagnostics.writer import (
    COLUMNS,
    DIAGNOSTICS_FILE,
    diagnostics_frame,
    read_diagnostics,
    summary_metrics,
    write_diagnostics,
)


def _attention_frame() -> pd.DataFrame:
    rows = [{"module": "decoder.token_to_image", "layer": layer, "head": head, "kind": kind, "value": value + head}
            for layer in (0, 1) for head in (0, 1)
            for kind, value in (("entropy_gap", 0.1), ("mask_mass_q", 0.2), ("kl", 0.3))]
    rows.append({"module": "decoder.self_attn", "layer": 0, "head": 0, "kind": "entropy_gap", "value": -0.5})
    return pd.DataFrame(rows)  # no step column: defaults to 0


def _recon_frames() -> list[pd.DataFrame]:
    units = [{"unit": "u1", "curve": {"out": [10.0, 0.1, 10.0, 0.1], "round": [5.0, 1.0, 5.0, 1.0]}},
             {"unit": "u2", "curve": {"out": [1.0, 0.1, 0.01, 0.001]}}]
    entries = [{"after": "start", "errors": {"b": {"queries": 1.0, "keys": 1.0}}},
               {"after": "u1", "errors": {"b": {"queries": 1.5, "keys": 0.5}}}]
    return [oscillation_frame(units, window=1), interference_frame(entries)]


def test_parquet_round_trip_keeps_rows_columns_and_types(tmp_path):
    frames = [_attention_frame(), *_recon_frames()]
    path = write_diagnostics(tmp_path / "run1", "run1", frames)
    assert path == tmp_path / "run1" / DIAGNOSTICS_FILE and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [DIAGNOSTICS_FILE]  # no temp file left behind
    back = read_diagnostics(tmp_path / "run1")
    expected = diagnostics_frame("run1", frames)
    pd.testing.assert_frame_equal(back, expected)
    assert list(back.columns) == COLUMNS and (back["run_id"] == "run1").all()
    assert len(back) == sum(len(f) for f in frames)
    assert back.loc[back["module"] == "decoder.self_attn", "step"].tolist() == [0]


def test_frames_lacking_a_column_are_refused(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        diagnostics_frame("r", [pd.DataFrame({"module": ["m"], "layer": [0], "head": [0], "value": [1.0]})])


def test_summary_metrics_average_layers_heads_units_and_streams():
    metrics = summary_metrics(diagnostics_frame("r", [_attention_frame(), *_recon_frames()]))
    assert metrics["diag/entropy_gap_t2i"] == pytest.approx(0.6)  # heads 0 and 1: 0.1, 1.1
    assert metrics["diag/mask_mass_q_t2i"] == pytest.approx(0.7)
    assert metrics["diag/kl_t2i"] == pytest.approx(0.8)
    assert metrics["diag/entropy_gap_self"] == pytest.approx(-0.5)
    # u1/out alternates by a factor 100 (index 4), u2/out is a straight line in log space; `round` is ignored
    assert metrics["diag/oscillation_index"] == pytest.approx(2.0)
    assert metrics["diag/slope_sign_changes"] == pytest.approx(50.0)
    assert metrics["diag/interference"] == pytest.approx(0.25)  # queries +0.5, keys 0
    assert all(k.startswith("diag/") and math.isfinite(v) for k, v in metrics.items())


def test_summary_metrics_of_attention_only_runs_omit_the_reconstruction_numbers():
    metrics = summary_metrics(diagnostics_frame("r", [_attention_frame()]))
    assert "diag/oscillation_index" not in metrics and "diag/entropy_gap_t2i" in metrics


def test_an_empty_table_round_trips_and_has_no_summary(tmp_path):
    write_diagnostics(tmp_path, "run-0", [])
    frame = read_diagnostics(tmp_path)
    assert len(frame) == 0 and list(frame.columns) == COLUMNS
    assert summary_metrics(frame) == {}

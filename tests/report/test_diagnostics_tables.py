"""analysis/diagnostics_tables.py: the oscillation and boundary summaries recomputed from records."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers import REPO


def _script():
    spec = importlib.util.spec_from_file_location("diagnostics_tables", REPO / "analysis" / "diagnostics_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, name: str, curve: list[float]):
    run_dir = tmp_path / name
    run_dir.mkdir()
    units = [{"unit": "decoder.u1", "steps": len(curve), "curve": {"out": curve, "total": [5.0, 1.0] * 10}},
             {"unit": "encoder.blocks.0", "steps": 20, "curve": {"out": [1.0, 10.0] * 10}}]  # not a decoder unit
    interference = [{"after": "start", "errors": {"s": {"queries": 0.5, "keys": 0.4}}},
                    {"after": "decoder.u1", "errors": {"s": {"queries": 0.2, "keys": 0.1}}}]
    record = {"name": name, "metrics": {"eval/mAP": 0.4},
              "details": {"recon": {"units": units, "interference": interference}}}
    (run_dir / "record.json").write_text(json.dumps(record))
    return run_dir


def test_an_exponential_decay_has_zero_oscillation_and_only_decoder_units_count(tmp_path):
    table = _script().oscillation([_run(tmp_path, "decay", [10.0 ** -k for k in range(20)])])
    assert table["units"].tolist() == [1]
    assert table["oscillation index"][0] == pytest.approx(0.0, abs=1e-12)
    assert table["slope sign changes /100"][0] == 0.0 and table["mAP"][0] == 0.4


def test_boundaries_are_the_last_interference_entry(tmp_path):
    table = _script().boundaries([_run(tmp_path, "r", [1.0] * 10)])
    assert table[["step", "queries", "keys"]].values.tolist() == [["s", 0.2, 0.1]]


def test_an_unknown_table_prints_the_usage(capsys):
    assert _script().main(["nope", "runs/x"]) == 2
    assert "diagnostics_tables.py" in capsys.readouterr().err

"""Run records are written atomically, read back whole, and listed oldest first."""

from __future__ import annotations

import json

from carsam.record import RunRecord, list_records, new_run_id, read_record, write_record


def _record(run_id: str) -> RunRecord:
    return RunRecord(run_id=run_id, name="n", method="rtn", model={"type": "testbed"}, w_bits=4, a_bits=4,
                     prompts="detector", seed=0, config={}, versions={}, git_commit="x", started_at="t")


def test_record_round_trips(tmp_path):
    rec = _record("a")
    rec.metrics["eval/mAP"] = 0.5
    write_record(tmp_path / "a", rec)
    assert read_record(tmp_path / "a")["metrics"] == {"eval/mAP": 0.5}


def test_write_leaves_no_temporary_files(tmp_path):
    write_record(tmp_path / "a", _record("a"))
    write_record(tmp_path / "a", _record("a"))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["record.json"]


def test_list_records_skips_folders_without_record(tmp_path):
    write_record(tmp_path / "1", _record("1"))
    (tmp_path / "2").mkdir()
    write_record(tmp_path / "3", _record("3"))
    assert [r["run_id"] for r in list_records(tmp_path)] == ["1", "3"]
    assert list_records(tmp_path / "missing") == []


def test_run_ids_are_unique_and_filesystem_safe():
    ids = {new_run_id("a/b c") for _ in range(50)}
    assert len(ids) == 50 and all("/" not in i and " " not in i for i in ids)


def test_record_is_valid_json_with_required_keys(tmp_path):
    write_record(tmp_path / "a", _record("a"))
    data = json.loads((tmp_path / "a" / "record.json").read_text())
    for key in ("run_id", "method", "model", "w_bits", "a_bits", "prompts", "seed", "versions", "git_commit",
                "timings", "metrics"):
        assert key in data

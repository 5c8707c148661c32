"""The page embeds exactly what the run records and diagnostics files hold, and survives bad inputs."""

from __future__ import annotations

import json
import logging
import math

import pandas as pd

from carsam.diagnostics.writer import read_diagnostics
from carsam.record import write_record
from carsam.report.dashboard import build_dashboard, dashboard_data, extract_embedded_data

from .helpers import make_record


def _page_data(runs_dir, tmp_path) -> tuple[str, dict]:
    page = build_dashboard(runs_dir, tmp_path / "page.html").read_text(encoding="utf-8")
    return page, extract_embedded_data(page)


def test_embedded_runs_match_the_records(fake_runs, tmp_path):
    _, data = _page_data(fake_runs["dir"], tmp_path)
    assert [r["run_id"] for r in data["runs"]] == ["r1", "r2", "r3"]
    for run in data["runs"]:
        rec = fake_runs["records"][run["run_id"]]
        assert run["metrics"] == rec.metrics
        assert (run["name"], run["method"], run["w_bits"], run["a_bits"], run["status"]) == (
            rec.name, rec.method, rec.w_bits, rec.a_bits, rec.status)
        assert run["seconds"] == rec.timings["total"] and run["timings"] == rec.timings


def test_embedded_diagnostics_match_the_parquet_files(fake_runs, tmp_path):
    _, data = _page_data(fake_runs["dir"], tmp_path)
    for run_id in ("r1", "r2"):
        df, diag = read_diagnostics(fake_runs["dir"] / run_id), data["diagnostics"][run_id]
        attention = df[~df["kind"].str.contains("/")]
        assert sorted(map(tuple, diag["attention"])) == sorted(
            attention[["module", "layer", "head", "kind", "value"]].itertuples(index=False, name=None))
        assert len(diag["attention"]) == 2 * 2 * 2 * 3 + 2 * 2 * 3  # entropy x 2 modules, mask mass t2i only
        loss = df[df["kind"] == "loss/out"]
        assert set(diag["curves"]) == set(loss["module"])
        for unit, rows in loss.groupby("module"):
            assert diag["curves"][unit]["out"] == {"step": rows["step"].tolist(), "value": rows["value"].tolist()}
        stats = df[df["kind"].isin(["oscillation_index/out", "interference/out"])]
        assert sorted(map(tuple, diag["unit_stats"])) == sorted(
            stats[["module", "kind", "step", "value"]].itertuples(index=False, name=None))


def test_run_without_diagnostics_is_in_the_table(fake_runs, tmp_path):
    _, data = _page_data(fake_runs["dir"], tmp_path)
    plain = next(r for r in data["runs"] if r["run_id"] == "r3")
    assert plain["has_diagnostics"] is False and "r3" not in data["diagnostics"]
    assert plain["metrics"] == {"eval/mAP": 0.21}


def test_empty_runs_dir_gives_a_no_runs_page(tmp_path):
    for runs_dir in (tmp_path / "empty", tmp_path / "missing"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        page, data = _page_data(runs_dir, tmp_path)
        assert data["runs"] == [] and data["diagnostics"] == {}
        assert f"no runs under {runs_dir}" in page


def test_corrupt_record_and_diagnostics_do_not_crash_the_build(fake_runs, tmp_path, caplog):
    runs = fake_runs["dir"]
    (runs / "bad").mkdir()
    (runs / "bad" / "record.json").write_text("{not json")
    (runs / "list").mkdir()
    (runs / "list" / "record.json").write_text("[1, 2]")
    (runs / "r2" / "diagnostics.parquet").write_bytes(b"not a parquet file")
    with caplog.at_level(logging.WARNING):
        _, data = _page_data(runs, tmp_path)
    assert [r["run_id"] for r in data["runs"]] == ["r1", "r2", "r3"]
    assert set(data["diagnostics"]) == {"r1"} and not data["runs"][1]["has_diagnostics"]
    assert "unreadable run record" in caplog.text and "unreadable diagnostics" in caplog.text


def test_script_end_tag_in_a_name_is_escaped(fake_runs, tmp_path):
    write_record(fake_runs["dir"] / "r4", make_record("r4", "__CARSAM_DATA__ <!-- <script>", "rtn"))
    page, data = _page_data(fake_runs["dir"], tmp_path)
    names = [r["name"] for r in data["runs"]]
    assert names[2] == "omse </script><b>bold</b>" and names[3] == "__CARSAM_DATA__ <!-- <script>"
    blob = page.split('id="carsam-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in blob and json.loads(blob) == data


def test_non_finite_numbers_become_null_and_the_blob_is_strict_json(tmp_path):
    write_record(tmp_path / "runs" / "n", make_record("n", "nan", "rtn", eval__mAP=math.nan, eval__mIoU=math.inf))
    page = build_dashboard(tmp_path / "runs").read_text(encoding="utf-8")
    blob = page.split('id="carsam-data">', 1)[1].split("</script>", 1)[0]

    def reject(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")

    assert json.loads(blob, parse_constant=reject)["runs"][0]["metrics"] == {"eval/mAP": None, "eval/mIoU": None}


def test_build_writes_the_default_file_atomically(fake_runs):
    path = build_dashboard(fake_runs["dir"])
    assert path == fake_runs["dir"] / "dashboard.html"
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert not list(fake_runs["dir"].glob(".*.tmp"))


def test_data_needs_no_network_assets(fake_runs, tmp_path):
    page, _ = _page_data(fake_runs["dir"], tmp_path)
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    assert "<link" not in page and "src=" not in page
    assert dashboard_data(fake_runs["dir"])["runs"] == extract_embedded_data(page)["runs"]


def test_diagnostics_frame_columns_survive_nan_values(tmp_path):
    from carsam.diagnostics.writer import write_diagnostics

    runs = tmp_path / "runs"
    write_record(runs / "x", make_record("x", "x", "rtn"))
    frame = pd.DataFrame([("u", -1, -1, "oscillation_index/out", 0, math.nan)],
                         columns=["module", "layer", "head", "kind", "step", "value"])
    write_diagnostics(runs / "x", "x", [frame])
    assert dashboard_data(runs)["diagnostics"]["x"]["unit_stats"] == [["u", "oscillation_index/out", 0, None]]


def test_embedded_maps_match_the_maps_files_and_frames_are_stored_once(fake_runs, tmp_path):
    import numpy as np

    from carsam.diagnostics.maps import read_attention_maps

    _, data = _page_data(fake_runs["dir"], tmp_path)
    assert sorted(data["maps"]) == ["r1", "r2"]  # r3 has no maps file
    for run_id in ("r1", "r2"):
        maps, entry = read_attention_maps(fake_runs["dir"] / run_id), data["maps"][run_id]
        assert entry["layers"] == [0, 1, 2] and entry["grid"] == maps.grid
        for i, prompt in enumerate(entry["prompts"]):
            assert (prompt["image_id"], prompt["prompt_index"]) == (7, i)
            np.testing.assert_allclose(prompt["q"], maps.q[i].reshape(3, -1), atol=1e-6)
            np.testing.assert_allclose(prompt["fp"], maps.fp[i].reshape(3, -1), atol=1e-6)
            assert data["frames"][prompt["frame"]].startswith("data:image/png;base64,")
    assert len(data["frames"]) == 2  # both runs show the same two frames


def test_runs_that_differ_only_in_their_seed_share_a_setting(tmp_path):
    from tests.report.helpers import make_run, metrics

    root = tmp_path / "runs"
    make_run(root, "a0", "ptq4sam", metrics(0.40), seed=0)
    make_run(root, "a1", "ptq4sam", metrics(0.42), seed=1)
    make_run(root, "b0", "ptq4sam", metrics(0.41), bits=6)
    settings = {r["run_id"]: r["setting"] for r in dashboard_data(root)["runs"]}
    assert settings["a0"] == settings["a1"] != settings["b0"]
    assert "W4A4" in settings["a0"] and "W6A6" in settings["b0"]


def test_a_sam2_run_shows_its_model_and_is_not_grouped_with_sam_v1(tmp_path):
    from tests.report.helpers import make_run, metrics

    root = tmp_path / "runs"
    make_run(root, "v1", "ptq4sam", metrics(0.40))
    make_run(root, "s2", "ptq4sam", metrics(0.30), model={"type": "sam2_testbed", "sam2_stability_fallback": False})
    runs = {r["run_id"]: r for r in dashboard_data(root)["runs"]}
    assert (runs["v1"]["model"], runs["s2"]["model"]) == ("testbed", "sam2_testbed")
    assert runs["v1"]["setting"] != runs["s2"]["setting"]


def test_a_run_with_an_empty_diagnostics_table_is_embedded_empty_not_skipped(tmp_path, caplog):
    from carsam.diagnostics.writer import write_diagnostics
    from tests.report.helpers import make_run, metrics

    write_diagnostics(make_run(tmp_path, "fp1", "fp", metrics(0.5)), "fp1", [])  # an FP run's table: no rows
    with caplog.at_level("WARNING"):
        data = dashboard_data(tmp_path)
    assert data["diagnostics"]["fp1"] == {"attention": [], "curves": {}, "unit_stats": []}
    assert "skipping" not in caplog.text

"""Bad input gives one clear line on stderr, exit code 2, and never touches records already written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carsam.cli import main
from carsam.record import list_records
from tests.helpers import experiment, real_data_overrides, write_json


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["run", *argv, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.fixture()
def base_args(tmp_path, small_coco, random_testbed_checkpoint) -> list[str]:
    """An FP run on the small real-path set with the random testbed (fast), runs under tmp."""
    return [experiment("fp.yaml"), f"runs_dir={tmp_path / 'runs'}", f"model.checkpoint={random_testbed_checkpoint}",
            "data.calib_size=2", *real_data_overrides(small_coco)]


def test_valid_run_succeeds_and_writes_record(capsys, tmp_path, base_args):
    code, _ = _run(capsys, *base_args)
    records = list_records(tmp_path / "runs")
    assert code == 0 and [r["status"] for r in records] == ["completed"]
    assert set(records[0]["metrics"]) == {"eval/mAP", "eval/mAP50", "eval/mIoU", "eval/gt_box_mAP", "eval/gt_box_mAP50"}


def test_missing_checkpoint(capsys, base_args):
    code, line = _run(capsys, *base_args, "model.checkpoint=/nonexistent/sam.pth")
    assert code == 2 and "checkpoint not found: /nonexistent/sam.pth" in line


def test_corrupt_checkpoint(capsys, tmp_path, base_args):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a torch file" * 10)
    code, line = _run(capsys, *base_args, f"model.checkpoint={bad}")
    assert code == 2 and "corrupt" in line and str(bad) in line


def test_checkpoint_of_another_model_type(capsys, base_args, random_testbed_checkpoint):
    code, line = _run(capsys, *base_args, "model.type=vit_b", f"model.checkpoint={random_testbed_checkpoint}")
    assert code == 2 and "does not match model type 'vit_b'" in line


@pytest.mark.parametrize("override", ["quant.w_bits=1", "quant.a_bits=17"])
def test_bits_out_of_range_write_nothing(capsys, tmp_path, base_args, override):
    code, line = _run(capsys, *base_args, "method=rtn", override)
    assert code == 2 and "2..16" in line
    assert not (tmp_path / "runs").exists()


def test_unknown_config_key(capsys, base_args):
    code, line = _run(capsys, *base_args, "quant.wbits=4")
    assert code == 2 and "unknown config key 'quant.wbits'" in line


def test_prompts_naming_unknown_image_ids(capsys, tmp_path, small_coco, base_args):
    prompts = json.loads(Path(small_coco["prompts"]).read_text())
    prompts.append({**prompts[0], "image_id": 987654})
    path = write_json(tmp_path / "prompts.json", prompts)
    code, line = _run(capsys, *base_args, f"data.prompts={path}")
    assert code == 2 and "987654" in line


def test_empty_calibration_set(capsys, tmp_path, small_coco, base_args):
    coco = json.loads(Path(small_coco["calib_annotations"]).read_text())
    path = write_json(tmp_path / "empty.json", {**coco, "images": [], "annotations": []})
    code, line = _run(capsys, *base_args, "method=rtn", f"data.calib_annotations={path}")
    assert code == 2 and "empty" in line.lower()


def test_missing_image_file(capsys, tmp_path, small_coco, base_args):
    coco = json.loads(Path(small_coco["annotations"]).read_text())
    coco["images"][0] = {**coco["images"][0], "file_name": "missing_image.png"}
    path = write_json(tmp_path / "ann.json", coco)
    code, line = _run(capsys, *base_args, f"data.annotations={path}")
    assert code == 2 and "missing_image.png" in line


def test_failures_keep_earlier_records_and_record_the_failure(capsys, tmp_path, small_coco, base_args):
    assert _run(capsys, *base_args)[0] == 0
    before = {r["run_id"]: r for r in list_records(tmp_path / "runs")}
    assert _run(capsys, *base_args, f"data.annotations={tmp_path / 'nope.json'}")[0] == 2
    after = {r["run_id"]: r for r in list_records(tmp_path / "runs")}
    assert all(after[k] == v for k, v in before.items())
    failed = [r for k, r in after.items() if k not in before]
    assert len(failed) == 1 and failed[0]["status"] == "failed" and "nope.json" in failed[0]["error"]


def test_every_subcommand_has_help(capsys):
    for argv in (["--help"], ["run", "--help"], ["sweep", "--help"], ["report", "--help"], ["testbed", "--help"],
                 ["testbed", "build", "--help"], ["testbed", "data", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out

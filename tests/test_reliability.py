"""The reliability matrix (issue 15): bad inputs and faults end in one line on stderr and exit 2, a failed record
with the reason, and no change to records already written; nothing non-finite is ever scored as a result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from carsam.cli import main
from carsam.eval.inference import SamBoxPredictor
from carsam.models.finite import NonFiniteError, check_finite_, non_finite_tensors
from carsam.record import list_records
from carsam.testbed.spec import build_testbed_from_checkpoint
from tests.helpers import experiment, real_data_overrides


def _run(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """`carsam run ARGV --no-progress`: (exit code, last stderr line, every stderr line)."""
    code = main(["run", *argv, "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else "", lines


@pytest.fixture()
def base_args(tmp_path, small_coco, random_testbed_checkpoint) -> list[str]:
    """An RTN W8A8 run of the random testbed on the small real-path set (about a second), runs under tmp."""
    return [experiment("rtn_w8a8.yaml"), f"runs_dir={tmp_path / 'runs'}",
            f"model.checkpoint={random_testbed_checkpoint}", "data.calib_size=2", "diagnostics.enabled=false",
            "tracking.mode=disabled", *real_data_overrides(small_coco)]


@pytest.fixture()
def earlier_run(capsys, tmp_path, base_args) -> dict:
    """One completed run under the runs folder; the cases assert it is unchanged after theirs."""
    code, _, _ = _run(capsys, *base_args)
    assert code == 0
    return {r["run_id"]: r for r in list_records(tmp_path / "runs")}


def _assert_failed_cleanly(tmp_path: Path, before: dict, message: str) -> dict:
    """Every earlier record unchanged; exactly one new record, `failed`, whose error holds `message`."""
    after = {r["run_id"]: r for r in list_records(tmp_path / "runs")}
    assert all(after[k] == v for k, v in before.items())
    new = [r for k, r in after.items() if k not in before]
    assert len(new) == 1 and new[0]["status"] == "failed" and message in new[0]["error"], new
    assert not new[0].get("metrics")  # nothing was scored
    return new[0]


def _poisoned_checkpoint(source: Path, folder: Path, name: str, value: float) -> Path:
    """A copy of the checkpoint `source` with `value` (NaN or Inf) in one element of tensor `name`."""
    state = torch.load(source, weights_only=True)
    state[name] = state[name].clone()
    state[name].view(-1)[3] = value
    path = folder / f"poisoned_{name}.pth"
    torch.save(state, path)
    return path


# ---------- non-finite weights and outputs ----------

@pytest.mark.parametrize(("tensor", "value"), [("mask_decoder.transformer.layers.0.cross_attn_token_to_image"
                                                 ".q_proj.weight", float("nan")),
                                                ("image_encoder.blocks.0.mlp.lin1.weight", float("inf"))])
def test_a_checkpoint_with_one_non_finite_weight_is_refused(capsys, tmp_path, base_args, earlier_run,
                                                          random_testbed_checkpoint, tensor, value):
    bad = _poisoned_checkpoint(random_testbed_checkpoint, tmp_path, tensor, value)
    code, line, lines = _run(capsys, *base_args, f"model.checkpoint={bad}")
    assert code == 2 and line.startswith("carsam: error: non-finite values after loading the checkpoint")
    assert tensor in line and "1 NaN/Inf" in line and not any("Traceback" in x for x in lines)
    _assert_failed_cleanly(tmp_path, earlier_run, tensor)


def test_the_guard_names_the_stage_the_tensor_and_how_many_more():
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    with torch.no_grad():
        module[0].weight[0, 0] = float("nan")
        module[0].bias[1] = float("inf")
    module[1].running_mean[2] = float("-inf")  # buffers are checked too
    assert [name for name, _, _ in non_finite_tensors(module)] == ["0.weight", "0.bias", "1.running_mean"]
    with pytest.raises(NonFiniteError, match=r"after MAC: 0\.weight has 1 NaN/Inf of 9 \(and 2 more tensors\)"):
        check_finite_(module, "MAC")
    check_finite_(torch.nn.Linear(2, 2), "anything")  # finite: no error


def test_a_non_finite_decoder_output_stops_the_evaluation(random_testbed_checkpoint, small_coco):
    from carsam.data.coco import CocoBoxPrompts

    val = CocoBoxPrompts(small_coco["images"], small_coco["annotations"], small_coco["prompts"])
    sam = build_testbed_from_checkpoint(random_testbed_checkpoint)
    with torch.no_grad():
        sam.mask_decoder.iou_prediction_head.layers[-1].bias.fill_(float("nan"))
    predictor = SamBoxPredictor(sam)
    image_id = val.image_ids[0]
    with pytest.raises(NonFiniteError, match="IoU predictions hold"):
        predictor.predict(predictor.embed_image(val, image_id), val.prompts(image_id)[0])


def test_a_sweep_records_a_non_finite_trial_as_failed_not_as_a_score(tmp_path, small_coco,
                                                                     random_testbed_checkpoint):
    from carsam.sweep.runner import run_sweep
    from tests.sweep.helpers import write_space

    bad = _poisoned_checkpoint(random_testbed_checkpoint, tmp_path, "mask_decoder.output_upscaling.0.weight",
                               float("nan"))
    space = write_space(tmp_path, {"model.checkpoint": [str(bad), str(random_testbed_checkpoint)]})
    study = run_sweep(space, trials=2, runs_dir=str(tmp_path / "runs"),
                      overrides=[*real_data_overrides(small_coco), "data.calib_size=2", "diagnostics.enabled=false",
                                 "tracking.mode=disabled"])
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert "non-finite values after loading the checkpoint" in study.trials[0].user_attrs["error"]
    assert "eval/mAP" not in study.trials[0].user_attrs


# ---------- run liveness ----------

def _running_record(runs: Path, run_id: str, **details) -> Path:
    """A run folder whose record says `running` (written as the pipeline writes it at start)."""
    from carsam.record import RunRecord, write_record

    rec = RunRecord(run_id=run_id, name=run_id, method="rtn", model={}, w_bits=4, a_bits=4, prompts="detector",
                    seed=0, config={}, versions={}, git_commit="", started_at="", details=details)
    folder = runs / run_id
    write_record(folder, rec)
    return folder


def test_a_running_record_without_heartbeat_for_a_while_reads_as_interrupted(tmp_path):
    import datetime as dt
    import os
    import time

    from carsam.record import HEARTBEAT_FILE, STALE_SECONDS, Heartbeat, effective_status, read_record

    folder = _running_record(tmp_path, "r1")
    with Heartbeat(folder, interval=0.05):
        first = (folder / HEARTBEAT_FILE).stat().st_mtime_ns
        time.sleep(0.3)
        assert (folder / HEARTBEAT_FILE).stat().st_mtime_ns > first  # it keeps beating
    assert effective_status(read_record(folder), folder) == ("running", "")
    old = time.time() - STALE_SECONDS - 60
    os.utime(folder / HEARTBEAT_FILE, (old, old))
    status, note = effective_status(read_record(folder), folder)
    stamp = dt.datetime.fromtimestamp(old, dt.timezone.utc).isoformat(timespec="seconds")
    assert status == "interrupted" and note == f"no heartbeat since {stamp}"


def test_a_running_record_whose_process_is_gone_reads_as_interrupted_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    from carsam.record import effective_status, read_record

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = _running_record(tmp_path, "r1", process={"pid": int(child.stdout), "host": socket.gethostname()})
    status, note = effective_status(read_record(folder), folder)
    assert status == "interrupted" and note.endswith("(its process is gone)")
    elsewhere = _running_record(tmp_path, "r2", process={"pid": int(child.stdout), "host": "another-host"})
    assert effective_status(read_record(elsewhere), elsewhere)[0] == "running"  # fresh heartbeat, other host


def _start_run(tmp_path: Path, small_coco, checkpoint: Path) -> tuple:
    """A `carsam run` subprocess (QDrop, long enough to be stopped midway) and its runs folder."""
    import signal
    import subprocess
    import sys

    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "carsam.cli", "run", experiment("qdrop_w4a4.yaml"), f"runs_dir={runs}",
           f"model.checkpoint={checkpoint}", "data.calib_size=2", "recon.iters=5000", "tracking.mode=disabled",
           *real_data_overrides(small_coco), "--no-progress"]
    # SIGINT back to its default in the child: a shell's background job (`cmd &`) starts with SIGINT ignored, and
    # an ignored disposition is inherited, so under such a launcher the child would never see the test's Ctrl-C
    def default_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint), runs


def _wait_for_running(runs: Path, proc, timeout: float = 120.0) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = list_records(runs)
        if records and records[0]["status"] == "running" and (runs / records[0]["run_id"] / "heartbeat").is_file():
            time.sleep(1.0)  # into the method
            return records[0]
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    raise AssertionError("the run never started")


@pytest.mark.slow
def test_sigterm_and_ctrl_c_write_interrupted_and_sigkill_reads_as_interrupted(tmp_path, small_coco,
                                                                              random_testbed_checkpoint):
    import signal

    proc, runs = _start_run(tmp_path / "term", small_coco, random_testbed_checkpoint)
    _wait_for_running(runs, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143 and "carsam: interrupted (SIGTERM)" in proc.stderr.read()
    record = list_records(runs)[0]
    assert record["status"] == "interrupted" and record["error"] == "interrupted (KeyboardInterrupt: SIGTERM)"

    proc, runs = _start_run(tmp_path / "int", small_coco, random_testbed_checkpoint)
    _wait_for_running(runs, proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=60) == 130 and "carsam: interrupted (SIGINT)" in proc.stderr.read()
    assert list_records(runs)[0]["status"] == "interrupted"

    proc, runs = _start_run(tmp_path / "kill", small_coco, random_testbed_checkpoint)
    _wait_for_running(runs, proc)
    proc.kill()
    proc.wait(timeout=60)
    record = list_records(runs)[0]
    assert record["status"] == "interrupted" and "its process is gone" in record["status_note"]


def test_report_status_lists_and_clean_stale_removes_only_interrupted_runs(capsys, tmp_path, base_args,
                                                                           earlier_run):
    import socket
    import subprocess
    import sys

    runs = tmp_path / "runs"
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _running_record(runs, "dead", process={"pid": int(child.stdout), "host": socket.gethostname()})
    assert main(["report", "--runs", str(runs), "--status"]) == 0
    out = capsys.readouterr().out
    assert "dead  interrupted  no heartbeat since" in out and "completed" in out
    assert main(["clean", "--runs", str(runs), "--stale", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out and (runs / "dead").is_dir()
    assert main(["clean", "--runs", str(runs), "--stale"]) == 0
    assert not (runs / "dead").exists()
    assert {r["run_id"]: r for r in list_records(runs)} == earlier_run  # the completed run is untouched
    with pytest.raises(SystemExit):
        main(["clean", "--runs", str(runs)])  # nothing is removed without --stale


def test_a_record_that_is_not_an_object_is_skipped_by_the_report(capsys, tmp_path, base_args, earlier_run):
    runs = tmp_path / "runs"
    (runs / "broken").mkdir()
    (runs / "broken" / "record.json").write_text("[1, 2, 3]")
    (runs / "latin1").mkdir()
    (runs / "latin1" / "record.json").write_bytes(b'{"name": "caf\xe9"}')
    assert main(["report", "--runs", str(runs)]) == 0
    assert "1 run records" in capsys.readouterr().out  # the two bad files are skipped, the good run reported
    assert [r["run_id"] for r in list_records(runs)] == list(earlier_run)


# ---------- sweeps and the command line ----------

def _categorical_space(folder: Path, values: list[int]) -> Path:
    path = folder / "cat_space.py"
    path.write_text(f'EXPERIMENT = "{experiment("rtn_w8a8.yaml")}"\n\n'
                    "def suggest(trial):\n"
                    f"    return [f\"quant.w_bits={{trial.suggest_categorical('quant.w_bits', {values})}}\"]\n")
    return path


def test_a_resumed_study_samples_new_points_and_never_repeats_a_completed_set(tmp_path, base_args):
    from carsam.sweep.runner import run_sweep

    space, runs = _categorical_space(tmp_path, [3, 4, 5, 6, 7, 8]), str(tmp_path / "runs")
    overrides = [a for a in base_args[1:] if not a.startswith("runs_dir=")]
    run_sweep(space, trials=2, runs_dir=runs, overrides=overrides)
    study = run_sweep(space, trials=4, runs_dir=runs, overrides=overrides)  # the same seed, resumed
    done = [t.params["quant.w_bits"] for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 4 and len(set(done)) == 4, done
    assert len(list_records(runs)) == 4  # a pruned repeat writes no record


def test_an_exhausted_space_stops_instead_of_proposing_forever(tmp_path, base_args, caplog):
    from carsam.sweep.runner import run_sweep

    overrides = [a for a in base_args[1:] if not a.startswith("runs_dir=")]
    with caplog.at_level("WARNING", logger="carsam.sweep.runner"):
        study = run_sweep(_categorical_space(tmp_path, [6, 8]), trials=3, runs_dir=str(tmp_path / "runs"),
                          overrides=overrides)
    assert sorted(t.params["quant.w_bits"] for t in study.trials if t.state.name == "COMPLETE") == [6, 8]
    assert "looks exhausted" in caplog.text


def test_overrides_are_accepted_after_the_options(capsys, tmp_path, base_args):
    code = main(["run", base_args[0], "--no-progress", *base_args[1:], "quant.w_bits=6"])
    assert code == 0
    assert list_records(tmp_path / "runs")[0]["w_bits"] == 6
    with pytest.raises(SystemExit) as exc:
        main(["run", base_args[0], "--no-progress", "--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_the_dashboard_refuses_a_network_host_without_allow_remote_and_a_port_out_of_range(capsys, tmp_path):
    assert main(["dashboard", "--runs", str(tmp_path), "--serve", "--host", "0.0.0.0"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("carsam: error: --host 0.0.0.0 would serve every run to the network")
    assert "--allow-remote" in line
    with pytest.raises(SystemExit) as exc:
        main(["dashboard", "--runs", str(tmp_path), "--serve", "--port", "70000"])
    assert exc.value.code == 2 and "must be a TCP port in 0..65535, got 70000" in capsys.readouterr().err


# ---------- configuration ----------

def test_a_non_utf8_experiment_file_is_one_line(capsys, tmp_path, base_args):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"method: rtn\n# caf\xe9\n")
    code, line, _ = _run(capsys, str(bad), *base_args[1:])
    assert code == 2 and line == f"carsam: error: experiment file {bad} is not UTF-8 text (byte 17); save it as UTF-8"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("override", "key"), [("seed=-1", "seed"), ("recon.seed=-3", "recon.seed"),
                                               ("seed=4294967296", "seed")])
def test_a_seed_out_of_range_fails_before_the_run_folder(capsys, tmp_path, base_args, override, key):
    code, line, _ = _run(capsys, *base_args, override)
    assert code == 2 and line.startswith(f"carsam: error: {key} must be in [0, 2**32)")
    assert not (tmp_path / "runs").exists()


# ---------- data, checked before any heavy work ----------

def _edited_annotations(small_coco, tmp_path: Path, edit) -> Path:
    """A copy of the val annotations after `edit(data)`."""
    import json

    data = json.loads(Path(small_coco["annotations"]).read_text())
    edit(data)
    path = tmp_path / "edited_instances.json"
    path.write_text(json.dumps(data))
    return path


def _first(data: dict, key: str = "annotations") -> dict:
    return data[key][0]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: _first(d)["bbox"].__setitem__(2, -5.0), "has a box of non-positive width or height"),
    (lambda d: _first(d)["bbox"].__setitem__(1, float("nan")), "not 4 finite numbers"),
    (lambda d: _first(d).__setitem__("category_id", 999), "category_id 999, which is not in 'categories'"),
    (lambda d: _first(d).__setitem__("image_id", 424242), "names image_id 424242"),
    (lambda d: _first(d).__setitem__("segmentation", {"size": [3, 3], "counts": "fake"}), "an RLE mask of size [3, 3]"),
    (lambda d: _first(d).__setitem__("segmentation", []), "has no usable segmentation"),
])
def test_a_bad_gt_annotation_is_named_before_any_heavy_work(capsys, tmp_path, small_coco, base_args, earlier_run,
                                                           edit, message):
    path = _edited_annotations(small_coco, tmp_path, edit)
    code, line, lines = _run(capsys, *base_args, f"data.annotations={path}")
    assert code == 2 and f"annotations file {path}: annotation id" in line and message in line
    assert not any("Traceback" in x for x in lines)
    failed = _assert_failed_cleanly(tmp_path, earlier_run, message)
    assert "method" not in failed["timings"]  # refused before the method ran


def test_missing_area_and_iscrowd_are_filled_in_as_coco_tools_do(capsys, tmp_path, small_coco, base_args, caplog):
    def strip(data):
        for ann in data["annotations"]:
            ann.pop("area", None)
            ann.pop("iscrowd", None)
    path = _edited_annotations(small_coco, tmp_path, strip)
    with caplog.at_level("WARNING", logger="carsam.data.coco"):
        code, _, _ = _run(capsys, *base_args, f"data.annotations={path}")
    assert code == 0 and "lacked 'area' or 'iscrowd'; filled in" in caplog.text
    reference, _, _ = _run(capsys, *base_args)
    records = sorted(list_records(tmp_path / "runs"), key=lambda r: r["run_id"])
    assert records[0]["metrics"]["eval/mAP"] == records[1]["metrics"]["eval/mAP"]  # the filled areas are exact


def test_a_val_set_without_ground_truth_is_refused(capsys, tmp_path, small_coco, base_args, earlier_run):
    path = _edited_annotations(small_coco, tmp_path, lambda d: d.__setitem__("annotations", []))
    code, line, _ = _run(capsys, *base_args, f"data.annotations={path}", "data.prompt_source=detector",
                         f"data.prompts={_no_prompts(tmp_path)}")
    assert code == 2 and "has no ground-truth instance" in line
    _assert_failed_cleanly(tmp_path, earlier_run, "has no ground-truth instance")


def _no_prompts(tmp_path: Path) -> Path:
    path = tmp_path / "no_prompts.json"
    path.write_text("[]")
    return path


@pytest.mark.parametrize("score", [1.5, -0.1])
def test_detector_scores_outside_0_1_are_refused(capsys, tmp_path, small_coco, base_args, score):
    import json

    prompts = json.loads(Path(small_coco["prompts"]).read_text())
    prompts[2]["score"] = score
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    code, line, _ = _run(capsys, *base_args, f"data.prompts={path}")
    assert code == 2 and f"entry 2 has score {score} outside [0, 1]" in line


def test_a_calibration_size_beyond_the_set_names_the_setting_and_the_file(capsys, tmp_path, small_coco, base_args):
    code, line, _ = _run(capsys, *base_args, "data.calib_size=32")
    assert code == 2 and line.startswith("carsam: error: data.calib_size = 32: subset size must be in [1, 4]")
    assert str(small_coco["calib_annotations"]) in line


def test_an_empty_calibration_set_is_named_by_its_file(capsys, tmp_path, small_coco, base_args):
    import json

    data = json.loads(Path(small_coco["calib_annotations"]).read_text())
    data["annotations"] = []
    path = tmp_path / "empty_calib.json"
    path.write_text(json.dumps(data))
    code, line, _ = _run(capsys, *base_args, f"data.calib_annotations={path}")
    assert code == 2
    assert line == f"carsam: error: data.calib_size = 2: {path} has no images with prompts: the set is empty"


def _copy_images(small_coco, tmp_path: Path) -> Path:
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(small_coco["images"], folder)
    return folder


def test_an_image_whose_size_differs_from_its_entry_is_found_before_the_method(capsys, tmp_path, small_coco,
                                                                              base_args, earlier_run):
    import json

    from PIL import Image

    folder = _copy_images(small_coco, tmp_path)
    entry = json.loads(Path(small_coco["annotations"]).read_text())["images"][-1]
    Image.new("RGB", (entry["width"] + 3, entry["height"])).save(folder / entry["file_name"])
    code, line, _ = _run(capsys, *base_args, f"data.images={folder}")
    assert code == 2 and f"{entry['file_name']} is {entry['width'] + 3}x{entry['height']} (WxH)" in line
    assert "method" not in _assert_failed_cleanly(tmp_path, earlier_run, "(WxH)")["timings"]


def test_sixteen_bit_and_jpeg_under_png_images_are_read_by_content(capsys, tmp_path, small_coco, base_args):
    import json

    import numpy as np
    from PIL import Image

    from carsam.data.coco import to_rgb8

    wide = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16))
    assert wide.mode.startswith("I;16") and to_rgb8(wide)[0, :, 0].tolist() == [0, 1, 255]
    folder = _copy_images(small_coco, tmp_path)
    images = json.loads(Path(small_coco["annotations"]).read_text())["images"]
    gray = np.asarray(Image.open(folder / images[0]["file_name"]).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray).save(folder / images[0]["file_name"])  # a 16-bit grayscale PNG
    Image.open(folder / images[1]["file_name"]).convert("RGB").save(folder / images[1]["file_name"], format="JPEG")
    code, _, _ = _run(capsys, *base_args, f"data.images={folder}")
    assert code == 0
    assert list_records(tmp_path / "runs")[0]["metrics"]["eval/mIoU"] > 0


# ---------- faults: a full disk, an unreachable database ----------

def _fail_writes_to(monkeypatch, file_name: str) -> None:
    """Make every atomic write whose target is named `file_name` fail as a full disk does."""
    import errno

    original = Path.replace

    def replace(self, target):
        if Path(target).name == file_name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, target)
    monkeypatch.setattr(Path, "replace", replace)


def test_a_full_disk_at_the_start_names_the_file_and_leaves_no_empty_run_folder(capsys, monkeypatch, tmp_path,
                                                                               base_args, earlier_run):
    _fail_writes_to(monkeypatch, "config.yaml")
    code, line, _ = _run(capsys, *base_args)
    assert code == 2 and line.startswith("carsam: error: [Errno 28] No space left on device: cannot write ")
    assert line.endswith("config.yaml")
    assert {r["run_id"]: r for r in list_records(tmp_path / "runs")} == earlier_run
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")) == list(earlier_run)


def test_a_full_disk_mid_run_names_the_file_and_the_record_says_so(capsys, monkeypatch, tmp_path, base_args,
                                                                   earlier_run):
    _fail_writes_to(monkeypatch, "segm_results.json")
    code, line, _ = _run(capsys, *base_args)
    assert code == 2 and "No space left on device: cannot write" in line and line.endswith("segm_results.json")
    _assert_failed_cleanly(tmp_path, earlier_run, "segm_results.json")


def test_an_unreachable_database_is_one_line(capsys, tmp_path):
    from tests.sweep.helpers import write_space

    space = write_space(tmp_path, {"quant.w_bits": [8]})
    url = "postgresql+psycopg2://postgres@127.0.0.1:1/nowhere"
    code = main(["sweep", str(space), "--trials", "1", "--storage", url, "--runs", str(tmp_path / "runs"),
                 "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1].startswith(f"carsam: error: storage '{url}' cannot be used after 5 attempts")
    assert "check that the database server is up" in lines[-1]


# ---------- what a record says about its data and its name ----------

def test_the_record_hashes_its_data_files_and_lists_the_calibration_images(capsys, tmp_path, small_coco, base_args):
    from carsam.data.coco import CocoBoxPrompts
    from carsam.files import file_sha256

    assert _run(capsys, *base_args)[0] == 0
    data = list_records(tmp_path / "runs")[0]["details"]["data"]
    assert data["val"]["annotations_sha256"] == file_sha256(small_coco["annotations"])
    assert data["val"]["prompts_sha256"] == file_sha256(small_coco["prompts"])
    assert data["calib"]["annotations_sha256"] == file_sha256(small_coco["calib_annotations"])
    pool = CocoBoxPrompts(small_coco["calib_images"], small_coco["calib_annotations"], None, prompt_source="gt_boxes")
    assert data["calib"]["image_ids"] == pool.subset(2, seed=0, require_prompts=True).image_ids
    folder = _copy_images(small_coco, tmp_path)
    first = sorted(folder.iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")  # one changed byte in one image file: another images hash
    assert _run(capsys, *base_args, f"data.images={folder}")[0] == 0
    hashes = {r["details"]["data"]["val"]["images_sha256"] for r in list_records(tmp_path / "runs")}
    assert len(hashes) == 2


def test_a_run_is_named_after_its_file_and_the_overrides_that_change_it(capsys, tmp_path, base_args):
    assert _run(capsys, *base_args, "quant.w_bits=6", "quant.quantize_encoder=false")[0] == 0
    assert _run(capsys, *base_args, "name=mine")[0] == 0
    names = sorted(r["name"] for r in list_records(tmp_path / "runs"))
    # the calibration size changes the quantized model and is named; paths and bookkeeping are not
    assert names == ["mine", "rtn_w8a8+data.calib_size=2+quant.w_bits=6+quant.quantize_encoder=false"]


# ---------- configuration values, refused before the run folder exists ----------

@pytest.mark.parametrize(("override", "message"), [
    ("quant.w_bits=1", "2..16"),
    ("method=bogus", "method must be one of"),
    ("device=gpu", "device must be cpu, auto, cuda or cuda:N"),
    ("data.calib_size=0", "data.calib_size must be >= 1"),
    ("diagnostics.images=0", "diagnostics.images must be >= 1"),
    ("recon.quant_prob=1.5", "recon.quant_prob must be in (0, 1]"),
    ("mac.strength=2", "mac.strength"),
    ("quant.wbits=4", "unknown config key 'quant.wbits'"),
    ("quant.w_bits=four", "quant.w_bits"),
])
def test_a_bad_setting_is_one_line_and_writes_nothing(capsys, tmp_path, base_args, override, message):
    code, line, lines = _run(capsys, *base_args, override)
    assert code == 2 and line.startswith("carsam: error: ") and message in line and len(lines) == 1
    assert not (tmp_path / "runs").exists()


def test_a_yaml_python_object_tag_is_refused(capsys, tmp_path, base_args):
    bad = tmp_path / "evil.yaml"
    bad.write_text("method: !!python/object/apply:os.system ['echo owned']\n")
    code, line, _ = _run(capsys, str(bad), *base_args[1:])
    assert code == 2 and f"experiment file {bad} is not valid YAML" in line


def test_a_pickle_that_runs_code_is_refused_as_a_checkpoint(capsys, tmp_path, base_args, earlier_run):
    class Payload:
        def __reduce__(self):
            return (print, ("a checkpoint must never run code",))

    bad = tmp_path / "evil.pth"
    torch.save({"weights": Payload()}, bad)
    code, line, lines = _run(capsys, *base_args, f"model.checkpoint={bad}")
    assert code == 2 and str(bad) in line and "a checkpoint must never run code" not in "\n".join(lines)
    assert {r["run_id"]: r for r in list_records(tmp_path / "runs")}.keys() >= earlier_run.keys()


def test_a_run_name_cannot_leave_the_runs_folder(capsys, tmp_path, base_args):
    assert _run(capsys, *base_args, "name=../../escaped")[0] == 0
    (folder,) = [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]
    assert folder.parent == tmp_path / "runs" and "/" not in folder.name and ".." not in folder.name
    assert not (tmp_path / "escaped").exists()


def test_methods_that_do_not_calibrate_need_no_calibration_files(capsys, tmp_path, small_coco,
                                                                 random_testbed_checkpoint):
    without_calib = [a for a in real_data_overrides(small_coco) if not a.startswith("data.calib_")]
    args = [f"runs_dir={tmp_path / 'runs'}", f"model.checkpoint={random_testbed_checkpoint}",
            "diagnostics.enabled=false", "tracking.mode=disabled", *without_calib]
    for name in ("fp.yaml", "box_as_mask.yaml"):
        assert _run(capsys, experiment(name), *args)[0] == 0
    records = list_records(tmp_path / "runs")
    assert [r["details"]["data"]["calib"] for r in records if r["method"] == "fp"] == [None]
    code, line, _ = _run(capsys, experiment("rtn_w8a8.yaml"), *args)
    assert code == 2 and "a method that calibrates needs data.calib_images and data.calib_annotations" in line


def test_prompt_boxes_reaching_outside_their_image_are_clipped_with_a_count(tmp_path, small_coco, caplog):
    import json

    import numpy as np

    from carsam.data.coco import CocoBoxPrompts, clip_boxes_xywh

    boxes, changed = clip_boxes_xywh(np.array([[-5.0, 2, 20, 10], [3, 4, 5, 6], [90, 90, 30, 30]]),
                                     np.array([100.0, 100, 100]), np.array([100.0, 100, 100]))
    assert changed == 2 and boxes.tolist() == [[0, 2, 15, 10], [3, 4, 5, 6], [90, 90, 10, 10]]
    prompts = json.loads(Path(small_coco["prompts"]).read_text())
    prompts[0]["bbox"] = [-10.0, -10.0, 1000.0, 1000.0]
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    with caplog.at_level("WARNING", logger="carsam.data.coco"):
        val = CocoBoxPrompts(small_coco["images"], small_coco["annotations"], path)
    assert "1 of" in caplog.text and "clipped to it" in caplog.text
    height, width = val.image_size(prompts[0]["image_id"])
    assert val.prompts(prompts[0]["image_id"])[0].max(axis=0)[2:].tolist() == [width, height]


def test_the_dashboard_shows_a_dead_run_as_interrupted_with_when(tmp_path):
    import socket
    import subprocess
    import sys

    from carsam.report.dashboard import dashboard_data

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _running_record(tmp_path, "dead", process={"pid": int(child.stdout), "host": socket.gethostname()})
    (run,) = dashboard_data(tmp_path)["runs"]
    assert run["status"] == "interrupted" and run["status_note"].startswith("no heartbeat since ")

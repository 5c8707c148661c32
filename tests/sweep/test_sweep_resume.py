"""A sweep runs its trials as run records, and a second invocation resumes instead of repeating."""

from __future__ import annotations

from carsam.record import list_records
from carsam.sweep.runner import run_sweep, trials_table
from tests.helpers import experiment, real_data_overrides

SPACE = '''
EXPERIMENT = "{experiment}"
GRID = {{"quant.w_bits": [6, 8], "quant.a_bits": [8]}}

def suggest(trial):
    return [f"{{k}}={{trial.suggest_categorical(k, v)}}" for k, v in GRID.items()]
'''


def _space(tmp_path, experiment: str):
    path = tmp_path / "tiny_space.py"
    path.write_text(SPACE.format(experiment=experiment))
    return path


def test_each_trial_writes_a_record_and_resume_runs_only_missing(tmp_path, small_coco, random_testbed_checkpoint):
    space = _space(tmp_path, experiment("rtn_w8a8.yaml"))
    overrides = [f"model.checkpoint={random_testbed_checkpoint}", "data.calib_size=2", "quant.w_observer=minmax",
                 *real_data_overrides(small_coco)]
    runs = tmp_path / "runs"
    study = run_sweep(space, trials=1, runs_dir=str(runs), overrides=overrides)
    assert len(study.trials) == 1
    study = run_sweep(space, trials=2, runs_dir=str(runs), overrides=overrides)
    records = list_records(runs)
    assert len(study.trials) == 2 and len(records) == 2
    assert sorted(r["details"]["trial"] for r in records) == [0, 1]
    assert {r["w_bits"] for r in records} == {6, 8}
    assert len(run_sweep(space, trials=2, runs_dir=str(runs), overrides=overrides).trials) == 2
    table = trials_table(study)
    assert list(table["state"]) == ["COMPLETE", "COMPLETE"] and "eval/mAP" in table


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path, small_coco):
    space = _space(tmp_path, experiment("rtn_w8a8.yaml"))
    overrides = [f"model.checkpoint={tmp_path / 'missing.pth'}", *real_data_overrides(small_coco)]
    study = run_sweep(space, trials=2, runs_dir=str(tmp_path / "runs"), overrides=overrides)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert "checkpoint not found" in study.trials[0].user_attrs["error"]
    assert [r["status"] for r in list_records(tmp_path / "runs")] == ["failed", "failed"]


def test_rerun_retries_failed_grid_points_until_the_grid_is_complete(tmp_path, small_coco, random_testbed_checkpoint):
    space = _space(tmp_path, experiment("rtn_w8a8.yaml"))
    data = [*real_data_overrides(small_coco), "data.calib_size=2", "quant.w_observer=minmax"]
    runs = str(tmp_path / "runs")
    broken = run_sweep(space, trials=1, runs_dir=runs, overrides=[f"model.checkpoint={tmp_path / 'none.pth'}", *data])
    failed_params = broken.trials[0].params
    study = run_sweep(space, trials=2, runs_dir=runs,
                      overrides=[f"model.checkpoint={random_testbed_checkpoint}", *data])
    completed = [t.params for t in study.trials if t.state.name == "COMPLETE"]
    assert len(completed) == 2 and failed_params in completed
    assert sorted(p["quant.w_bits"] for p in completed) == [6, 8]

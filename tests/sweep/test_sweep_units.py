"""Storage URLs, heartbeats, objectives, failures and grid queueing of `carsam sweep`, in one process."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState, create_trial

from carsam import cli
from carsam.config import ConfigError
from carsam.record import list_records
from carsam.sweep.runner import best_trials, enqueue_missing, fail_stale, planned_trials, run_sweep, trials_table
from carsam.sweep.space import load_space
from carsam.sweep.storage import (
    HEARTBEAT_ATTR,
    HeartbeatJournalStorage,
    default_storage,
    heartbeat_interval,
    journal_path,
    open_storage,
)
from tests.helpers import REPO
from tests.sweep.helpers import states, write_space


def test_journal_url_names_a_file_and_other_urls_are_not_journals():
    assert journal_path("journal:runs/optuna.journal") == Path("runs/optuna.journal")
    assert journal_path("journal:///tmp/study.journal") == Path("/tmp/study.journal")
    assert journal_path("sqlite:///runs/optuna.db") is None
    assert journal_path("postgresql+psycopg2://u@127.0.0.1:5432/db") is None
    with pytest.raises(ConfigError, match="names no file"):
        journal_path("journal:")


def test_default_storage_is_sqlite_for_one_worker_and_a_journal_for_several():
    assert default_storage("runs") == "sqlite:///runs/optuna.db"
    assert default_storage("runs", workers=3) == "journal:runs/optuna.journal"


def test_heartbeat_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.setenv("CARSAM_SWEEP_HEARTBEAT", "7")
    assert heartbeat_interval() == 7 and heartbeat_interval(2) == 2
    monkeypatch.setenv("CARSAM_SWEEP_HEARTBEAT", "soon")
    with pytest.raises(ConfigError, match="whole number"):
        heartbeat_interval()
    with pytest.raises(ConfigError, match=">= 1"):
        heartbeat_interval(0)


def test_every_storage_is_opened_with_a_heartbeat(tmp_path):
    journal = open_storage(f"journal:{tmp_path / 'sub' / 's.journal'}", heartbeat=1)
    assert isinstance(journal, HeartbeatJournalStorage) and is_heartbeat_enabled(journal)
    assert (tmp_path / "sub" / "s.journal").is_file()
    rdb = open_storage(f"sqlite:///{tmp_path / 'db' / 'o.db'}", heartbeat=1)
    assert rdb.get_heartbeat_interval() == 1 and rdb.get_heartbeat_stale_trial_callback() is not None


@pytest.mark.parametrize("url, message", [("mysql+nosuchdriver://u@127.0.0.1/db", "not a database URL"),
                                          ("runs/optuna.db", "not a database URL")])
def test_a_storage_url_that_names_no_database_is_a_config_error(url, message):
    with pytest.raises(ConfigError, match=message):
        open_storage(url, heartbeat=1)


def test_a_database_url_without_its_driver_is_a_config_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_psycopg2(name, *args, **kwargs):
        if name.startswith("psycopg2"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psycopg2)
    with pytest.raises(ConfigError, match="driver"):
        open_storage("postgresql+psycopg2://u@127.0.0.1:1/db", heartbeat=1)


HEARTBEAT_WITHOUT_OPTIMIZE = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")


def _running_trial(storage) -> tuple[optuna.Study, optuna.Trial]:
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    trial.suggest_categorical("quant.w_bits", [4, 8])
    return study, trial


@HEARTBEAT_WITHOUT_OPTIMIZE
def test_journal_trial_whose_heartbeat_stopped_is_failed_and_queued_again(tmp_path):
    storage = open_storage(f"journal:{tmp_path / 's.journal'}", heartbeat=1)
    study, trial = _running_trial(storage)
    storage.record_heartbeat(trial._trial_id)
    fail_stale(study)
    assert states(study) == ["RUNNING"]  # a fresh heartbeat: alive
    storage.set_trial_system_attr(trial._trial_id, HEARTBEAT_ATTR, time.time() - 10)
    fail_stale(study)
    failed, retry = study.get_trials()
    assert (failed.state, retry.state) == (TrialState.FAIL, TrialState.WAITING)
    assert retry.system_attrs["failed_trial"] == failed.number and retry.params == failed.params


@pytest.mark.slow
def test_a_journal_lock_left_by_a_killed_writer_is_broken_within_seconds(tmp_path):
    journal = tmp_path / "s.journal"
    journal.touch()
    (tmp_path / "s.journal.lock").symlink_to(journal)  # what a worker killed mid-append leaves behind
    start = time.monotonic()
    optuna.create_study(study_name="s", storage=open_storage(f"journal:{journal}", heartbeat=1))
    assert time.monotonic() - start < 10  # lock grace 3 s for a 1 s heartbeat (Optuna's default: 30 s)


@pytest.mark.slow
@HEARTBEAT_WITHOUT_OPTIMIZE
def test_sqlite_trial_whose_heartbeat_stopped_is_failed_and_queued_again(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat=1)
    study, trial = _running_trial(storage)
    storage.record_heartbeat(trial._trial_id)
    time.sleep(3.0)  # past the grace period (2 x 1 s) with no heartbeat
    fail_stale(study)
    assert states(study) == ["FAIL", "WAITING"]
    assert study.get_trials()[1].system_attrs["failed_trial"] == 0


def test_best_trials_is_the_best_trial_or_the_pareto_front():
    study = optuna.create_study(directions=["maximize", "minimize"])
    assert best_trials(study) == []
    for values in ([0.5, 4.0], [0.6, 8.0], [0.4, 8.0], [0.6, 6.0]):
        study.add_trial(create_trial(values=values))
    assert [t.values for t in best_trials(study)] == [[0.5, 4.0], [0.6, 6.0]]
    single = optuna.create_study(direction="maximize")
    for value in (0.2, 0.7, 0.5):
        single.add_trial(create_trial(value=value))
    assert [t.number for t in best_trials(single)] == [1]


def test_objectives_default_to_map_and_are_validated(tmp_path):
    assert load_space(write_space(tmp_path, {"quant.w_bits": [8]})).objectives == (("eval/mAP", "maximize"),)
    multi = write_space(tmp_path, {"quant.w_bits": [8]}, name="multi",
                        extra='OBJECTIVES = (("eval/mAP", "maximize"), ("bits", "minimize"))')
    assert load_space(multi).directions == ["maximize", "minimize"]
    bad = write_space(tmp_path, {"quant.w_bits": [8]}, name="bad", extra='OBJECTIVES = (("bits", "smallest"),)')
    with pytest.raises(ConfigError, match="direction 'smallest'"):
        load_space(bad)


def test_multi_objective_sweep_optimizes_map_and_bits_and_prints_the_front(tmp_path, trial_overrides, capsys):
    space = write_space(tmp_path, {"quant.w_bits": [6, 8], "quant.a_bits": [8]}, name="bits_space",
                        extra='OBJECTIVES = (("eval/mAP", "maximize"), ("bits", "minimize"))')
    runs = tmp_path / "runs"
    assert cli.main(["sweep", str(space), *trial_overrides, "--trials", "2", "--runs", str(runs),
                     "--no-progress"]) == 0
    assert "Pareto front" in capsys.readouterr().out
    study = optuna.load_study(study_name="bits_space", storage=f"sqlite:///{runs / 'optuna.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    for t in study.trials:
        assert t.values == [t.user_attrs["eval/mAP"], (t.params["quant.w_bits"] + 8) / 2]
    assert 0 in {t.number for t in best_trials(study)}  # fewest bits: never dominated
    assert "bits" in trials_table(study)


def test_failing_trial_is_recorded_with_its_error_and_the_sweep_goes_on(tmp_path, trial_overrides):
    space = write_space(tmp_path, {"data.calib_size": [99, 2]})  # 99 > the 4 calibration images: that run fails
    runs = tmp_path / "runs"
    study = run_sweep(space, trials=2, runs_dir=str(runs), overrides=[o for o in trial_overrides
                                                                        if not o.startswith("data.calib_size")])
    assert states(study) == ["FAIL", "COMPLETE"]
    assert "subset size must be in [1, 4]" in study.trials[0].user_attrs["error"]
    records = sorted(list_records(runs), key=lambda r: r["details"]["trial"])
    assert [r["status"] for r in records] == ["failed", "completed"]
    assert study.trials[1].user_attrs["run_id"] == records[1]["run_id"]
    assert all(r["config"]["tracking"]["group"] == "tiny_space" and r["details"]["study"] == "tiny_space"
               for r in records)


def test_grid_is_queued_once_when_two_workers_prepare_the_study(tmp_path):
    space = load_space(write_space(tmp_path, {"quant.w_bits": [4, 6, 8], "quant.a_bits": [8]}))
    url = f"journal:{tmp_path / 's.journal'}"
    workers = [optuna.create_study(study_name="s", storage=open_storage(url, 1), load_if_exists=True)
               for _ in range(2)]
    assert len(enqueue_missing(workers[0], space, planned_trials(space, 9))) == 3
    assert enqueue_missing(workers[1], space, planned_trials(space, 9)) == []
    assert states(workers[1]) == ["WAITING"] * 3


def test_a_grid_point_queued_twice_runs_once(tmp_path, trial_overrides):
    space_path = write_space(tmp_path, {"quant.w_bits": [6, 8], "quant.a_bits": [8]})
    url = f"sqlite:///{tmp_path / 'o.db'}"
    racer = optuna.create_study(study_name="tiny_space", storage=url, direction="maximize")
    for _ in range(2):  # what two workers queueing at the same moment can leave behind
        racer.enqueue_trial({"quant.w_bits": 6, "quant.a_bits": 8})
    study = run_sweep(space_path, trials=2, storage=url, runs_dir=str(tmp_path / "runs"), overrides=trial_overrides)
    assert states(study) == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert study.trials[1].user_attrs["skipped"] == "duplicate of trial 0"
    assert sorted(t.params["quant.w_bits"] for t in study.trials if t.state is TrialState.COMPLETE) == [6, 8]
    assert len(list_records(tmp_path / "runs")) == 2


def test_rerunning_a_study_with_other_objectives_is_refused(tmp_path, trial_overrides):
    single = write_space(tmp_path, {"quant.w_bits": [8]}, name="same")
    run_sweep(single, trials=1, runs_dir=str(tmp_path / "runs"), overrides=trial_overrides)
    (tmp_path / "other").mkdir()
    multi = write_space(tmp_path / "other", {"quant.w_bits": [8]}, name="same",
                        extra='OBJECTIVES = (("eval/mAP", "maximize"), ("bits", "minimize"))')
    with pytest.raises(ConfigError, match="directions"):
        run_sweep(multi, trials=1, runs_dir=str(tmp_path / "runs"), overrides=trial_overrides)


def test_a_space_without_grid_plans_the_requested_trials(tmp_path):
    from tests.sweep.helpers import write_tpe_space

    space = load_space(write_tpe_space(tmp_path))
    assert space.grid == [] and planned_trials(space, 5) == 5
    assert planned_trials(load_space(write_space(tmp_path, {"quant.w_bits": [6, 8]})), 5) == 2


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.py")), ids=lambda p: p.name)
def test_every_shipped_space_suggests_a_valid_config(path):
    from carsam.config import resolve

    space = load_space(path)
    study = optuna.create_study(directions=space.directions, sampler=space.sampler(0))
    for params in space.grid[:1] or [{}]:
        study.enqueue_trial(params)
    config = resolve(space.experiment, space.overrides(study.ask()))
    assert config.method in ("rtn", "carsam")
    for experiment_path, overrides in space.references.values():
        resolve(experiment_path, overrides)  # every reference resolves too


def test_workers_share_the_cores_evenly_and_never_get_zero_threads():
    from carsam.sweep.runner import worker_threads

    assert [worker_threads(k, cpus=16) for k in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]


def test_start_points_are_queued_first_and_only_until_completed(tmp_path, trial_overrides):
    from tests.sweep.helpers import write_tpe_space

    path = write_tpe_space(tmp_path)
    path.write_text(path.read_text() + '\nSTART = [{"quant.w_bits": 6}]\n')
    space = load_space(path)
    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="tpe_space", storage=url, direction="maximize")
    assert enqueue_missing(study, space, planned_trials(space, 2)) == [{"quant.w_bits": 6}]
    assert enqueue_missing(study, space, planned_trials(space, 2)) == []  # already queued
    study = run_sweep(path, trials=2, storage=url, runs_dir=str(tmp_path / "runs"), overrides=trial_overrides)
    assert study.trials[0].params == {"quant.w_bits": 6} and states(study) == ["COMPLETE", "COMPLETE"]
    assert enqueue_missing(study, space, planned_trials(space, 3)) == []  # a rerun does not repeat it


@pytest.mark.parametrize("name", ["carsam_quick.py", "carsam_w4a4.py"])
def test_carsam_spaces_start_at_the_code_defaults(name):
    from carsam.config import JcarConfig, MacConfig, resolve

    space = load_space(REPO / "sweeps" / name)
    study = optuna.create_study(directions=space.directions, sampler=space.sampler(0))
    study.enqueue_trial(space.starts[0])
    config = resolve(space.experiment, space.overrides(study.ask()))
    assert config.mac == MacConfig(enabled=True) and config.jcar == JcarConfig(enabled=True)


def test_reference_runs_run_once_and_rerun_only_when_their_config_changes(tmp_path, trial_overrides):
    from tests.helpers import experiment

    extra = f'REFERENCES = {{"fp": ("{experiment("fp.yaml")}", []), "w6": ("{experiment("rtn_w8a8.yaml")}", ' \
            '["quant.w_bits=6"])}'
    space = write_space(tmp_path, {"quant.w_bits": [8]}, extra=extra)
    runs = tmp_path / "runs"
    run_sweep(space, trials=1, runs_dir=str(runs), overrides=trial_overrides)
    names = sorted(r["name"] for r in list_records(runs))
    assert names == ["tiny_space-ref-fp", "tiny_space-ref-w6", "tiny_space-t0"]
    w6 = next(r for r in list_records(runs) if r["name"] == "tiny_space-ref-w6")
    assert (w6["w_bits"], w6["a_bits"], w6["status"], w6["details"]["reference"]) == (6, 8, "completed", "w6")
    run_sweep(space, trials=1, runs_dir=str(runs), overrides=trial_overrides)
    assert len(list_records(runs)) == 3  # the references are reused, the trial is complete
    run_sweep(space, trials=1, runs_dir=str(runs), overrides=[*trial_overrides, "data.max_val_images=1"])
    assert sorted(r["name"] for r in list_records(runs)).count("tiny_space-ref-fp") == 2  # another config: rerun


def test_a_reference_naming_a_missing_experiment_is_refused(tmp_path):
    space = write_space(tmp_path, {"quant.w_bits": [8]}, extra='REFERENCES = {"fp": ("nowhere.yaml", [])}')
    with pytest.raises(ConfigError, match="reference 'fp' names .*nowhere.yaml"):
        load_space(space)
    malformed = write_space(tmp_path, {"quant.w_bits": [8]}, name="bad", extra='REFERENCES = {"fp": "fp.yaml"}')
    with pytest.raises(ConfigError, match="REFERENCES must map labels"):
        load_space(malformed)

"""`carsam sweep` as separate processes: workers sharing one study, and a worker killed mid-trial."""

from __future__ import annotations

import os
import signal
import subprocess

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from carsam.record import list_records
from carsam.sweep.runner import run_sweep
from tests.sweep.helpers import states, sweep_command, sweep_env, wait_for, write_space, write_tpe_space

pytestmark = pytest.mark.slow
PROCESS_TIMEOUT = 180  # seconds for one `carsam sweep` process (a few trials of about a second, plus imports)


def _records_by_trial(runs) -> dict[int, dict]:
    return {r["details"]["trial"]: r for r in list_records(runs)}


def test_two_workers_on_postgresql_complete_the_study_once(tmp_path, postgres_url, trial_overrides):
    space, runs = write_tpe_space(tmp_path), tmp_path / "runs"
    command = sweep_command(space, trial_overrides, "--trials", "4", "--storage", postgres_url, "--runs", str(runs))
    workers = [subprocess.Popen(command + ["--seed", str(i)], env=sweep_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [w.communicate(timeout=PROCESS_TIMEOUT)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = optuna.load_study(study_name="tpe_space", storage=postgres_url)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4, [(t.number, t.state.name, t.user_attrs) for t in study.trials]
    assert all(t.user_attrs.get("skipped") for t in study.trials if t.state.name != "COMPLETE")  # only races pruned
    numbers = [t.number for t in study.trials]
    assert len(set(numbers)) == len(numbers)
    records = _records_by_trial(runs)
    for t in complete:
        assert records[t.number]["status"] == "completed" and records[t.number]["run_id"] == t.user_attrs["run_id"]
        assert records[t.number]["details"]["study"] == "tpe_space"


def test_two_spawned_workers_run_each_grid_point_once(tmp_path, trial_overrides):
    space, runs = write_space(tmp_path, {"quant.w_bits": [4, 6, 8], "quant.a_bits": [8]}), tmp_path / "runs"
    study = run_sweep(space, trials=9, storage=f"journal:{tmp_path / 'study.journal'}", runs_dir=str(runs),
                      overrides=trial_overrides, workers=2)
    assert states(study) == ["COMPLETE"] * 3
    assert sorted(t.params["quant.w_bits"] for t in study.trials) == [4, 6, 8]
    assert sorted(r["status"] for r in list_records(runs)) == ["completed"] * 3


def _storage(kind: str, tmp_path) -> tuple[str, object]:
    """The `--storage` argument and a storage object the test reads the study through."""
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'optuna.db'}"
        return url, url
    path = tmp_path / "optuna.journal"
    return f"journal:{path}", JournalStorage(JournalFileBackend(str(path)))


def _running_after_a_completed_trial(study: optuna.Study, worker: subprocess.Popen) -> int | None:
    if worker.poll() is not None:
        pytest.fail(f"the sweep exited (rc {worker.returncode}) before it could be killed mid-trial")
    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state.name == "RUNNING" and t.params]
    if running and any(t.state.name == "COMPLETE" for t in trials):
        return running[0].number
    return None


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_killed_worker_resumes_keeping_completed_trials_and_retrying_the_running_one(tmp_path, trial_overrides, kind):
    space, runs = write_tpe_space(tmp_path), tmp_path / "runs"
    url, reader = _storage(kind, tmp_path)
    study = optuna.create_study(study_name="tpe_space", storage=reader, direction="maximize")  # for polling
    command = sweep_command(space, trial_overrides, "--trials", "3", "--storage", url, "--runs", str(runs),
                            "--heartbeat", "1")
    worker = subprocess.Popen(command, env=sweep_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        killed = wait_for(lambda: _running_after_a_completed_trial(study, worker), PROCESS_TIMEOUT,
                          "a completed trial and a running one")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    before = {t.number: t for t in study.get_trials() if t.state.name == "COMPLETE"}
    assert study.get_trials()[killed].state.name == "RUNNING"  # nothing finishes a killed trial

    done = subprocess.run(command, env=sweep_env(), capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = study.get_trials()
    for number, trial in before.items():  # kept as they were
        assert trials[number].state.name == "COMPLETE" and trials[number].values == trial.values
    assert trials[killed].state.name == "FAIL"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].params == trials[killed].params
    assert states(study).count("COMPLETE") == 3
    assert _records_by_trial(runs)[retries[0].number]["status"] == "completed"
    completed = [t.params["quant.w_bits"] for t in trials if t.state.name == "COMPLETE"]
    assert len(set(completed)) == len(completed) == 3, completed  # the resumed sampler repeated nothing

"""Optuna sweeps: a search space is a small Python file (`carsam.sweep.space`); every trial is one run record.

Before the trials, the space's reference runs (REFERENCES) that are not already under the runs folder run
once (`run_references`).

`run_sweep` brings a study to `trials` COMPLETE trials (a grid space: at most its number of points).
Running the same command again resumes: it runs only what is missing, re-queueing the grid points (or,
without a grid, the parameter sets) whose trials failed. Several workers (`workers=K`, or several
`carsam sweep` processes on one storage) share a study: each worker, before each trial, fails the trials
of dead workers (heartbeat, `carsam.sweep.storage`; they are queued again), stops once the study has its
COMPLETE trials, and waits while the trials still running elsewhere would complete it (they may fail or
die). A worker makes at most `trials - completed` attempts, so a space whose every run fails ends. A trial
whose run raises is recorded as FAIL with its error (user attribute `error`) and the sweep goes on.
A resumed study's sampler is seeded past the trials it holds (seed + trial count), so it proposes new points
rather than replaying its first ones, and a proposal that repeats a completed trial's parameters is pruned
without running (after `MAX_PRUNED_IN_A_ROW` such proposals in a row a worker stops: the space is exhausted).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import time
import warnings
from pathlib import Path
from typing import Any, cast

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from carsam import pipeline
from carsam.config import ConfigError, resolve, to_dict
from carsam.record import list_records
from carsam.sweep.space import BITS, SearchSpace, load_space, objective_value
from carsam.sweep.storage import default_storage, heartbeat_interval, open_storage
from carsam.sweep.summary import best_trials, trials_table

__all__ = ["SweepSpec", "best_trials", "enqueue_missing", "fail_stale", "make_objective", "planned_trials",
           "reference_name", "run_references", "run_sweep", "trials_table"]
logger = logging.getLogger(__name__)
MAX_POLL = 5.0  # seconds between checks while waiting for other workers' trials
MAX_PRUNED_IN_A_ROW = 25  # proposals that repeat completed trials before a worker calls the space exhausted


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """What one worker needs (picklable: `workers > 1` hands it to spawned processes)."""

    space: str
    trials: int
    storage: str
    study: str
    runs_dir: str
    seed: int = 0
    overrides: tuple[str, ...] = ()
    heartbeat: int | None = None
    progress: bool = False


def _params(trial: FrozenTrial) -> dict[str, Any]:
    """A trial's parameters, or those it was queued with (a WAITING or just-started queued trial)."""
    return trial.params or trial.system_attrs.get("fixed_params", {})


def _skip_reason(trial: optuna.Trial, planned: int | None) -> str | None:
    """Why this just-started trial should not run, or None. Two workers can race: both queue one grid point
    (a copy whose parameters completed, or are running in an earlier trial, is a duplicate), or both start a
    trial when one was missing (the later trials beyond `planned` are surplus)."""
    trials = trial.study.get_trials(deepcopy=False)
    this = next(t for t in trials if t.number == trial.number)
    running = [t for t in trials if t.state is TrialState.RUNNING and t.number <= trial.number]
    complete = [t for t in trials if t.state is TrialState.COMPLETE]
    point = this.system_attrs.get("fixed_params")
    for other in (complete + [t for t in running if t.number < trial.number]) if point else []:
        if _covered(cast("dict[str, Any]", point), [_params(other)]):  # the loop runs only when point is set
            return f"duplicate of trial {other.number}"
    if planned is not None and len(complete) + len(running) > planned:
        return f"surplus: the study has its {planned} trials completed or running"
    return None


def _run_trial(trial: optuna.Trial, space: SearchSpace, study_name: str, runs_dir: str,
               extra_overrides: list[str]) -> pipeline.RunRecord:
    # trials keep no model (a study of many would fill the disk; rerun the best one to keep it), unless asked
    overrides = [f"tracking.group={study_name}", "output.save_model=false", *space.overrides(trial), *extra_overrides]
    twin = _completed_twin(trial)
    if twin is not None:
        trial.set_user_attr("skipped", f"duplicate of completed trial {twin}")
        raise optuna.TrialPruned(f"the sampler proposed the parameters of completed trial {twin}")
    trial.set_user_attr("overrides", overrides)
    config = resolve(space.experiment, overrides)
    config = dataclasses.replace(config, name=f"{study_name}-t{trial.number}", runs_dir=runs_dir)
    return pipeline.run(config, extra={"study": study_name, "trial": trial.number})


def _completed_twin(trial: optuna.Trial) -> int | None:
    """The number of a COMPLETE trial with exactly this trial's parameters, else None."""
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if other.number != trial.number and other.params == trial.params:
            return other.number
    return None


def make_objective(space: SearchSpace, study_name: str, runs_dir: str, extra_overrides: list[str],
                   planned: int | None = None):
    """The Optuna objective: resolve the trial's config (`tracking.group` = the study), run it, return its
    objective value(s); the record's run id, bits and metrics become user attributes, an error `error`.
    A duplicate or surplus trial (`_skip_reason`) is pruned without running."""
    def objective(trial: optuna.Trial) -> float | list[float]:
        reason = _skip_reason(trial, planned)
        if reason is not None:
            trial.set_user_attr("skipped", reason)
            raise optuna.TrialPruned(reason)
        try:
            record = _run_trial(trial, space, study_name, runs_dir, extra_overrides)
            trial.set_user_attr("run_id", record.run_id)
            trial.set_user_attr(BITS, (record.w_bits + record.a_bits) / 2)
            for key, value in record.metrics.items():
                trial.set_user_attr(key, value)
            values = [objective_value(name, record) for name, _ in space.objectives]
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            raise
        return values[0] if len(values) == 1 else values
    return objective


def _open_study(space: SearchSpace, spec: SweepSpec) -> optuna.Study:
    """Create or load the study; its directions must be the space's."""
    study = optuna.create_study(study_name=spec.study, storage=open_storage(spec.storage, spec.heartbeat),
                                load_if_exists=True, directions=space.directions, sampler=space.sampler(spec.seed))
    existing = [d.name.lower() for d in study.directions]
    if existing != space.directions:
        raise ConfigError(f"study '{spec.study}' in {spec.storage} has directions {existing}, but the space "
                          f"asks for {space.directions}; use another --study name")
    study.set_user_attr("experiment", str(space.experiment))
    study.set_user_attr("objectives", [list(o) for o in space.objectives])
    # a resumed study must not replay the sampler's sequence from the start: seed it past the trials it has
    study.sampler = space.sampler(spec.seed + len(study.get_trials(deepcopy=False)))
    return study


def planned_trials(space: SearchSpace, trials: int) -> int:
    """The study's planned number of COMPLETE trials: `trials`, at most the grid's size."""
    return min(trials, len(space.grid)) if space.grid else trials


def enqueue_missing(study: optuna.Study, space: SearchSpace, planned: int) -> list[dict[str, Any]]:
    """Queue the grid points not completed (without a grid: the START points, then the parameter sets of
    failed trials that never completed), skipping those already queued or running, up to what the plan
    still needs.
    Two workers doing this at the same moment may queue a point twice: the second copy is pruned when
    it starts (`_skip_reason`). Returns the queued points."""
    trials = study.get_trials(deepcopy=False)
    done = [t.params for t in trials if t.state is TrialState.COMPLETE]
    pending: list[dict[str, Any]] = []
    for t in trials:
        if t.state in (TrialState.WAITING, TrialState.RUNNING) and _params(t) not in pending:
            pending.append(_params(t))
    failed = [t.params for t in trials if t.state is TrialState.FAIL and t.params]
    queue: list[dict[str, Any]] = []
    for point in space.grid or [*space.starts, *failed]:
        if not _covered(point, done + pending + queue):
            queue.append(point)
    queue = queue[:max(0, planned - len(done) - len(pending))]
    for point in queue:
        study.enqueue_trial(point)
    return queue


def _covered(point: dict[str, Any], params: list[dict[str, Any]]) -> bool:
    """Whether some parameter set agrees with `point` on all of its keys (a trial may suggest more)."""
    return any(all(key in p and p[key] == value for key, value in point.items()) for p in params)


def _counts(study: optuna.Study) -> dict[TrialState, int]:
    counts = dict.fromkeys(TrialState, 0)
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def fail_stale(study: optuna.Study) -> None:
    """Fail (and queue again) the running trials of dead workers (no heartbeat for the grace period)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _work(study: optuna.Study, objective: Any, planned: int, grid: bool, spec: SweepSpec) -> int:
    """Run trials until the study has `planned` COMPLETE ones or this worker's attempts are spent;
    returns the number of attempts."""
    from tqdm import tqdm

    budget = max(0, planned - _counts(study)[TrialState.COMPLETE])
    poll = min(float(heartbeat_interval(spec.heartbeat)), MAX_POLL)
    attempts = pruned_in_a_row = 0
    with tqdm(total=planned, desc=spec.study, unit="trial", disable=not spec.progress) as bar:
        while attempts < budget:
            fail_stale(study)
            counts = _counts(study)
            bar.n = counts[TrialState.COMPLETE]
            bar.refresh()
            complete, running, waiting = (counts[s] for s in (TrialState.COMPLETE, TrialState.RUNNING,
                                                               TrialState.WAITING))
            if complete >= planned or (grid and not waiting and not running):
                break
            if complete + running >= planned or (grid and not waiting):
                time.sleep(poll)  # the trials running elsewhere may complete the study, fail, or die
                continue
            states: list[TrialState] = []
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[lambda _, t: states.append(t.state)])
            pruned = states == [TrialState.PRUNED]  # a pruned duplicate or surplus trial ran nothing
            attempts += not pruned
            pruned_in_a_row = pruned_in_a_row + 1 if pruned else 0
            if pruned_in_a_row >= MAX_PRUNED_IN_A_ROW:
                logger.warning("study '%s': %d proposals in a row repeated completed trials; the space looks "
                               "exhausted, stopping this worker", spec.study, pruned_in_a_row)
                break
        bar.n = _counts(study)[TrialState.COMPLETE]
        bar.refresh()
    return attempts


def _worker(spec: SweepSpec) -> optuna.Study:
    space = load_space(spec.space)
    study = _open_study(space, spec)
    planned = planned_trials(space, spec.trials)
    fail_stale(study)
    enqueue_missing(study, space, planned)
    objective = make_objective(space, spec.study, spec.runs_dir, list(spec.overrides), planned)
    attempts = _work(study, objective, planned, bool(space.grid), spec)
    logger.info("study '%s': worker ran %d trials; %d/%d completed", spec.study, attempts,
                _counts(study)[TrialState.COMPLETE], planned)
    return study


def worker_threads(workers: int, cpus: int | None = None) -> int:
    """Intra-op threads for each of `workers` processes sharing `cpus` cores (default: this machine's):
    an even share, at least 1, so K workers never oversubscribe the cores (torch's default is one thread
    per core in every process)."""
    return max(1, (cpus or os.cpu_count() or 1) // workers)


def _spawned_worker(spec: SweepSpec, log_level: int, threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("carsam").setLevel(log_level)
    optuna.logging.set_verbosity(log_level)
    _worker(spec)


def _run_workers(spec: SweepSpec, workers: int) -> None:
    """`workers` spawned processes on the study (seeds seed..seed+K-1, the first one's progress bar), each
    with `worker_threads(workers)` torch threads unless OMP_NUM_THREADS is set."""
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger("carsam").getEffectiveLevel()
    threads = None if os.environ.get("OMP_NUM_THREADS") else worker_threads(workers)  # the user's setting wins
    procs = [context.Process(target=_spawned_worker, name=f"sweep-worker-{i}",
                             args=(dataclasses.replace(spec, seed=spec.seed + i, progress=spec.progress and i == 0),
                                   level, threads)) for i in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"sweep workers exited with an error: {', '.join(failed)} (see their logs above)")


def reference_name(study_name: str, label: str) -> str:
    """The run name of a study's reference run `label`."""
    return f"{study_name}-ref-{label}"


def run_references(space: SearchSpace, study_name: str, runs_dir: str, overrides: list[str]) -> dict[str, str]:
    """Run the space's REFERENCES (`carsam.sweep.space`) that have no completed record of the same name and
    resolved config under `runs_dir`; returns label -> run id (reused or new). A reference that fails is
    logged and left out; the trials still run."""
    done = {r.get("name"): r for r in list_records(runs_dir) if r.get("status") == "completed"}
    run_ids = {}
    for label, (experiment, ref_overrides) in space.references.items():
        config = resolve(experiment, [f"tracking.group={study_name}", *ref_overrides, *overrides])
        config = dataclasses.replace(config, name=reference_name(study_name, label), runs_dir=runs_dir)
        cached = done.get(config.name)
        if cached is not None and cached.get("config") == json.loads(json.dumps(to_dict(config))):
            logger.info("reference %s: reusing run %s", label, cached["run_id"])
            run_ids[label] = str(cached["run_id"])
            continue
        try:
            run_ids[label] = pipeline.run(config, extra={"study": study_name, "reference": label}).run_id
        except Exception as err:  # a reference is context for the trials, not a reason to skip them
            logger.error("reference %s failed (%s: %s); the trials run without it", label, type(err).__name__, err)
    return run_ids


def run_sweep(space_path: str | Path, *, trials: int, storage: str | None = None, study_name: str | None = None,
              runs_dir: str = "runs", seed: int = 0, overrides: list[str] | None = None, progress: bool = False,
              workers: int = 1, heartbeat: int | None = None) -> optuna.Study:
    """Bring the study to its planned COMPLETE trials (module docstring), with `workers` processes.
    `storage`: an Optuna storage URL or `journal:PATH`; default SQLite in `runs_dir`, a journal file there
    for several workers. `heartbeat`: seconds (default $CARSAM_SWEEP_HEARTBEAT or 60)."""
    space = load_space(space_path)
    resolve(space.experiment, overrides or [])  # a bad experiment or override fails once, before any trial
    heartbeat_interval(heartbeat)
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    spec = SweepSpec(str(space_path), trials, storage or default_storage(runs_dir, workers), study_name or space.name,
                     runs_dir, seed, tuple(overrides or ()), heartbeat, progress)
    run_references(space, spec.study, runs_dir, list(spec.overrides))
    if workers == 1:
        return _worker(spec)
    if spec.storage.startswith("sqlite"):
        logger.warning("%d workers on SQLite may fail with 'database is locked'; prefer journal:FILE", workers)
    study = _open_study(space, spec)  # created and queued once, before the workers start
    enqueue_missing(study, space, planned_trials(space, trials))
    _run_workers(spec, workers)
    return study

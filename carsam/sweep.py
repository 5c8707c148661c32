"""Optuna sweeps: a search space is a small Python file; every trial is one run record.

A space file defines
- `EXPERIMENT`: the experiment YAML the trials start from (absolute, or relative to the space file);
- `suggest(trial) -> list[str]`: the `key=value` overrides of one trial;
- optionally `GRID: dict[str, list]`: a full grid, run point by point in its declared order (each
  point is queued as a fixed trial, so a rerun queues exactly the points not yet completed, failed
  ones included; Optuna's GridSampler counts failed points as visited, which would lose them), and
  `DIRECTION` ("maximize", the default, applies to `eval/mAP`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna

from carsam import pipeline
from carsam.config import ConfigError, resolve

logger = logging.getLogger(__name__)
OBJECTIVE = "eval/mAP"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A loaded space file."""

    name: str
    experiment: Path
    module: ModuleType

    def overrides(self, trial: optuna.Trial) -> list[str]:
        return list(self.module.suggest(trial))

    @property
    def grid(self) -> list[dict[str, Any]]:
        """Every point of the space's GRID (empty without one), in declared order."""
        grid = getattr(self.module, "GRID", None) or {}
        keys = list(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*grid.values())]

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=seed)  # grid points arrive as queued fixed trials

    @property
    def direction(self) -> str:
        return getattr(self.module, "DIRECTION", "maximize")


def load_space(path: str | Path) -> SearchSpace:
    """Import a space file and check it defines EXPERIMENT and suggest(); ConfigError otherwise."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise ConfigError(f"search space must be an existing .py file, got {path}")
    spec = importlib.util.spec_from_file_location(f"carsam_space_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as err:
        raise ConfigError(f"search space {path} failed to import: {type(err).__name__}: {err}") from err
    if not hasattr(module, "EXPERIMENT") or not callable(getattr(module, "suggest", None)):
        raise ConfigError(f"search space {path} must define EXPERIMENT and suggest(trial)")
    return SearchSpace(path.stem, path.parent / module.EXPERIMENT, module)


def make_objective(space: SearchSpace, study_name: str, runs_dir: str, extra_overrides: list[str]):
    """The Optuna objective: resolve the trial's config, run it, return its mAP."""
    def objective(trial: optuna.Trial) -> float:
        overrides = space.overrides(trial) + extra_overrides
        config = resolve(space.experiment, overrides)
        config = dataclasses.replace(config, name=f"{study_name}-t{trial.number}", runs_dir=runs_dir)
        trial.set_user_attr("overrides", overrides)
        try:
            record = pipeline.run(config, extra={"study": study_name, "trial": trial.number})
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            raise
        trial.set_user_attr("run_id", record.run_id)
        for key, value in record.metrics.items():
            trial.set_user_attr(key, value)
        return record.metrics[OBJECTIVE]
    return objective


def run_sweep(space_path: str | Path, *, trials: int, storage: str | None = None, study_name: str | None = None,
              runs_dir: str = "runs", seed: int = 0, overrides: list[str] | None = None,
              progress: bool = False) -> optuna.Study:
    """Bring the study to `trials` finished trials (a study that exists is resumed, so running the
    same command again after an interruption only runs what is missing). Failed trials are recorded
    with their error and the sweep goes on."""
    space = load_space(space_path)
    resolve(space.experiment, overrides or [])  # a bad experiment or override fails once, before any trial
    study_name = study_name or space.name
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{Path(runs_dir) / 'optuna.db'}"
    study = optuna.create_study(study_name=study_name, storage=storage, load_if_exists=True,
                                direction=space.direction, sampler=space.sampler(seed))
    study.set_user_attr("experiment", str(space.experiment))
    objective = make_objective(space, study_name, runs_dir, overrides or [])
    done = [t.params for t in study.trials if t.state is optuna.trial.TrialState.COMPLETE]
    planned = min(trials, len(space.grid)) if space.grid else trials
    remaining = max(0, planned - len(done))
    logger.info("study '%s': %d completed trials, running %d more", study_name, len(done), remaining)
    if remaining:
        for params in _missing_points(study, space, done)[:remaining]:
            study.enqueue_trial(params, skip_if_exists=False)
        study.optimize(objective, n_trials=remaining, catch=(Exception,), show_progress_bar=progress)
    return study


def _missing_points(study: optuna.Study, space: SearchSpace, done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parameter sets to queue: the grid points not completed, or (without a grid) those of
    failed trials that never completed, so an interrupted or crashed point is run again."""
    if space.grid:
        return [p for p in space.grid if p not in done]
    retry: list[dict[str, Any]] = []
    for t in study.trials:
        if t.state is optuna.trial.TrialState.FAIL and t.params and t.params not in done + retry:
            retry.append(t.params)
    return retry


def trials_table(study: optuna.Study) -> "Any":
    """The study's trials as a pandas DataFrame: number, state, params, metrics, run id, error."""
    import pandas as pd

    rows = []
    for t in study.trials:
        row = {"trial": t.number, "state": t.state.name, **t.params}
        row.update({k: v for k, v in t.user_attrs.items() if k.startswith("eval/") or k in ("run_id", "error")})
        rows.append(row)
    return pd.DataFrame(rows)

"""Search-space files: a small Python module per study (see `carsam.sweep.runner`).

A space file defines
- `EXPERIMENT`: the experiment YAML the trials start from (absolute, or relative to the space file);
- `suggest(trial) -> list[str]`: the `key=value` overrides of one trial;
- optionally `GRID: dict[str, list]`: a full grid, run point by point in its declared order (each
  point is queued as a fixed trial, so a rerun queues exactly the points not yet completed, failed
  ones included; Optuna's GridSampler counts failed points as visited, which would lose them);
- optionally `START: list[dict]`: points (parameter name -> value) queued before the sampler's own, e.g.
  the code defaults, so a study always measures its reference point and the report's ablation tables
  (which hold runs at the defaults) are never empty after it; queued like grid points, so a rerun
  queues only those not completed;
- optionally `REFERENCES: dict[str, tuple[str, list[str]]]`: label -> (experiment YAML, overrides) of
  reference runs at the study's budget (e.g. FP, RTN, PTQ4SAM), run once before the trials and named
  `<study>-ref-<label>`; a completed record of that name with the same resolved config is reused, so a
  rerun of the study costs nothing for them, and the report shows the trials beside them;
- optionally `DIRECTION` ("maximize", the default, applies to `eval/mAP`), or `OBJECTIVES`, a sequence
  of `(name, direction)` pairs for a multi-objective study, e.g.
  `(("eval/mAP", "maximize"), ("bits", "minimize"))`. A name is a metric of the run record
  (`record.metrics`) or `bits`: the mean of the record's weight and activation bit-widths.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, cast

import optuna

from carsam.config import ConfigError

OBJECTIVE = "eval/mAP"
BITS = "bits"
DIRECTIONS = ("maximize", "minimize")


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
        if not grid:
            return []
        keys = list(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*grid.values())]

    @property
    def starts(self) -> list[dict[str, Any]]:
        """The space's START points (empty without them), in declared order."""
        return [dict(point) for point in getattr(self.module, "START", None) or []]

    @property
    def references(self) -> dict[str, tuple[Path, list[str]]]:
        """label -> (experiment path, overrides) of the space's REFERENCES (empty without them)."""
        declared = getattr(self.module, "REFERENCES", None) or {}
        folder = Path(cast(str, self.module.__file__)).parent  # experiments are relative to the space file
        return {str(label): (folder / experiment, [str(o) for o in overrides])
                for label, (experiment, overrides) in declared.items()}

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=seed)  # grid points arrive as queued fixed trials

    @property
    def objectives(self) -> tuple[tuple[str, str], ...]:
        """`(name, direction)` per objective: OBJECTIVES, else `eval/mAP` in DIRECTION."""
        declared = getattr(self.module, "OBJECTIVES", None)
        if declared is None:
            return ((OBJECTIVE, getattr(self.module, "DIRECTION", "maximize")),)
        return tuple((str(name), str(direction)) for name, direction in declared)

    @property
    def directions(self) -> list[Literal["maximize", "minimize"]]:
        # `load_space` (`_check_objectives`) rejects any other direction
        return cast("list[Literal['maximize', 'minimize']]", [direction for _, direction in self.objectives])


def objective_value(name: str, record: Any) -> float:
    """The value of objective `name` for a run record: `bits` or one of its metrics."""
    if name == BITS:
        return (record.w_bits + record.a_bits) / 2
    if name not in record.metrics:
        raise KeyError(f"objective '{name}' is not a metric of run {record.run_id} "
                       f"(metrics: {', '.join(sorted(record.metrics))})")
    return float(record.metrics[name])


def _check_objectives(space: SearchSpace, path: Path) -> None:
    try:
        objectives = space.objectives
    except (TypeError, ValueError) as err:
        raise ConfigError(f"search space {path}: OBJECTIVES must be (name, direction) pairs ({err})") from err
    if not objectives:
        raise ConfigError(f"search space {path}: OBJECTIVES is empty")
    for name, direction in objectives:
        if direction not in DIRECTIONS:
            raise ConfigError(f"search space {path}: objective '{name}' has direction '{direction}'; "
                              f"use one of {DIRECTIONS}")
    names = [name for name, _ in objectives]
    if len(set(names)) != len(names):
        raise ConfigError(f"search space {path}: OBJECTIVES repeats a name: {names}")


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
    space = SearchSpace(path.stem, path.parent / module.EXPERIMENT, module)
    _check_objectives(space, path)
    try:
        references = space.references
    except (TypeError, ValueError, AttributeError) as err:
        raise ConfigError(f"search space {path}: REFERENCES must map labels to (experiment, [overrides]) "
                          f"({err})") from err
    for label, (experiment, _) in references.items():
        if not experiment.is_file():
            raise ConfigError(f"search space {path}: reference '{label}' names {experiment}, which does not exist")
    return space

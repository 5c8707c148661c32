"""What a study found: its trials as a table, and its best trial or Pareto front."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from carsam.sweep.space import OBJECTIVE


def objective_names(study: optuna.Study) -> list[str]:
    """The study's objective names (as its space declared them)."""
    stored = study.user_attrs.get("objectives")
    return [name for name, _ in stored] if stored else [OBJECTIVE]


def trials_table(study: optuna.Study) -> Any:
    """The study's trials as a pandas DataFrame: number, state, params, retried trial, metrics, objectives,
    run id, error, why a trial was skipped."""
    import pandas as pd

    keep = {"run_id", "error", "skipped", *objective_names(study)}
    rows = []
    for t in study.trials:
        row = {"trial": t.number, "state": t.state.name, **t.params}
        if "failed_trial" in t.system_attrs:
            row["retry_of"] = t.system_attrs["failed_trial"]
        row.update({k: v for k, v in t.user_attrs.items() if k.startswith("eval/") or k in keep})
        rows.append(row)
    return pd.DataFrame(rows)


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best trial (single objective) or the Pareto front (several), in trial order; [] if none completed."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return sorted(study.best_trials, key=lambda t: t.number)

"""Reconstruction oscillation: indices of a loss curve, and cross-branch interference between units.

Definitions (a curve is the per-step loss of one reconstruction unit and one output stream):

- smoothed log-loss `s`: `log10(max(loss, 1e-30))`, then a moving average over `window` consecutive
  steps, kept only where the window is full ("valid" mode): n losses give `m = n - window + 1` values.
- `oscillation_index`: the mean over the interior of `s` of `|s[t+1] - 2 s[t] + s[t-1]|` (mean absolute
  second difference, decades per step squared). A straight line in log space (an exponential decay
  or a constant) gives 0; a loss jumping by a factor 10 up and down every step gives 4 at window 1.
- `slope_sign_changes`: the slope is `diff(s)`, zero slopes are dropped, and the number of sign flips
  between consecutive remaining slopes is divided by the number of consecutive slope pairs
  (`m - 2`) and multiplied by 100: sign changes per 100 steps, 0 for a monotone curve, 100 when
  the slope flips at every step.
Both are NaN when the smoothed curve has fewer than 3 values (or the curve holds a NaN/inf). On a
curve subsampled for the record, "step" means one recorded sample.

- `interference`: given the boundary errors of the quantized model before and after one unit is
  optimised (`{boundary: {"queries": mse, "keys": mse}}`, `carsam.recon.interference`), the mean over
  the chosen boundaries of the positive part of the rise, `max(0, after - before)`, per stream.
  `interference_series` applies it along the reconstruction's list of entries
  `[{"after": "start" | unit name, "errors": {...}}, ...]`, for each unit over the boundaries already
  reconstructed before it (when told which boundaries each unit reconstructs), else over all of them.
  Note: units reconstructed in data-flow order cannot change the error at a boundary upstream of
  them, so the restricted form is 0 there unless units overlap or run out of order; the unrestricted
  form catches what one unit does downstream, e.g. to the other stream (the cross-branch effect).

The `*_frame` functions turn record data into the long format of `diagnostics.parquet` (see
`carsam.diagnostics.writer`): kinds are `"{quantity}/{stream}"`, e.g. `loss/queries`,
`oscillation_index/out`, `interference/keys`, `boundary_error/queries`; `layer` and `head` are -1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

LOG_FLOOR = 1e-30
LOSS, OSCILLATION, SIGN_CHANGES = "loss", "oscillation_index", "slope_sign_changes"
INTERFERENCE, BOUNDARY_ERROR = "interference", "boundary_error"
NON_RECON_STREAMS = ("round", "total")  # recorded curves that are not a reconstruction error
ErrorMap = Mapping[str, Mapping[str, float]]


def kind_name(quantity: str, stream: str) -> str:
    """The `kind` column value of a per-stream quantity: `"{quantity}/{stream}"`."""
    return f"{quantity}/{stream}"


def smoothed_log_loss(curve: Sequence[float], window: int) -> np.ndarray:
    """`(n,)` losses -> `(n - window + 1,)` moving average of their log10 (empty if n < window)."""
    if int(window) != window or window < 1:
        raise ValueError(f"window must be a positive integer, got {window}")
    logs = np.log10(np.maximum(np.asarray(curve, dtype=np.float64), LOG_FLOOR))
    if logs.size < window:
        return np.empty(0)
    return np.convolve(logs, np.full(int(window), 1.0 / window), mode="valid")


def oscillation_index(curve: Sequence[float], window: int = 5) -> float:
    """Mean absolute second difference of the smoothed log10 loss (module docstring); NaN if too short."""
    s = smoothed_log_loss(curve, window)
    if s.size < 3 or not np.all(np.isfinite(s)):
        return float("nan")
    return float(np.mean(np.abs(np.diff(s, n=2))))


def slope_sign_changes(curve: Sequence[float], window: int = 5) -> float:
    """Sign changes of the smoothed log10 loss's slope per 100 steps (module docstring); NaN if too short."""
    s = smoothed_log_loss(curve, window)
    if s.size < 3 or not np.all(np.isfinite(s)):
        return float("nan")
    signs = np.sign(np.diff(s))
    signs = signs[signs != 0]
    flips = int(np.count_nonzero(signs[1:] != signs[:-1]))
    return 100.0 * flips / (s.size - 2)


def interference(errors_before: ErrorMap, errors_after: ErrorMap,
                 boundaries: Sequence[str] | None = None) -> dict[str, float]:
    """Per stream, the mean over `boundaries` of `max(0, after - before)` (NaN over no boundary).

    errors_*: `{boundary: {stream: mse}}`; boundaries: those to look at (None: every boundary of both).
    A boundary named but absent from either map raises `KeyError`.
    """
    names = [b for b in errors_before if b in errors_after] if boundaries is None else list(boundaries)
    missing = [b for b in names if b not in errors_before or b not in errors_after]
    if missing:
        raise KeyError(f"boundaries {missing} are missing from the errors before or after")
    streams = sorted({s for errors in errors_after.values() for s in errors})
    return {s: float(np.mean([max(0.0, errors_after[b][s] - errors_before[b][s]) for b in names]))
            if names else float("nan") for s in streams}


def interference_series(entries: Sequence[Mapping[str, Any]],
                        reconstructed: Mapping[str, Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """`interference` of each unit against the entry before it, along the reconstruction's entries.

    entries: `[{"after": "start" | unit, "errors": {boundary: {stream: mse}}}, ...]`, the first one the
    state before any unit. reconstructed: `{unit: boundaries that unit reconstructs}`; with it, unit k
    is scored over the boundaries of the units before it (k = 1: none, so NaN); without it, over every
    boundary. Returns `[{"after": unit, "index": k, "rise": {stream: value}}]` for k = 1, 2, ...
    """
    done: list[str]
    rows, done = [], []
    for k in range(1, len(entries)):
        boundaries = None if reconstructed is None else list(dict.fromkeys(done))
        rise = interference(entries[k - 1]["errors"], entries[k]["errors"], boundaries)
        rows.append({"after": entries[k]["after"], "index": k, "rise": rise})
        done.extend((reconstructed or {}).get(entries[k]["after"], ()))
    return rows


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Long-format rows (module, kind, step, value) with layer = head = -1."""
    columns = ["module", "layer", "head", "kind", "step", "value"]
    return pd.DataFrame([{"layer": -1, "head": -1, **r} for r in rows], columns=columns)


def curve_steps(num_points: int, steps: int | None) -> np.ndarray:
    """The step index of each of `num_points` recorded points of a curve spanning `steps` steps.

    A curve shorter than its run was subsampled evenly keeping the first and last step
    (`carsam.recon.driver.subsample`); `steps` None or equal to `num_points`: 0, 1, 2, ...
    """
    if steps is None or num_points >= steps or num_points < 2:
        return np.arange(num_points)
    return np.round(np.arange(num_points) * ((steps - 1) / (num_points - 1))).astype(np.int64)


def oscillation_frame(units: Sequence[Mapping[str, Any]], window: int = 5) -> pd.DataFrame:
    """Loss curves and their indices from the reconstruction's unit records, in long format.

    units: `[{"unit": name, "curve": {stream: [loss, ...]}, "steps": n (optional)}, ...]`. Rows:
    `loss/{stream}` per recorded point (step = its step index), and per unit and stream
    `oscillation_index/{stream}` and `slope_sign_changes/{stream}` (step 0).
    """
    rows: list[dict[str, Any]] = []
    for unit in units:
        for stream, curve in unit["curve"].items():
            steps = curve_steps(len(curve), unit.get("steps"))
            rows += [{"module": unit["unit"], "kind": kind_name(LOSS, stream), "step": int(t), "value": float(v)}
                     for t, v in zip(steps, curve)]
            rows.append({"module": unit["unit"], "kind": kind_name(OSCILLATION, stream), "step": 0,
                         "value": oscillation_index(curve, window)})
            rows.append({"module": unit["unit"], "kind": kind_name(SIGN_CHANGES, stream), "step": 0,
                         "value": slope_sign_changes(curve, window)})
    return _frame(rows)


def interference_frame(entries: Sequence[Mapping[str, Any]],
                       reconstructed: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """Boundary errors and interference from the reconstruction's entries, in long format.

    Rows: `boundary_error/{stream}` per boundary (module) and entry (step = entry index, 0 = start),
    and `interference/{stream}` per unit (module = the unit, step = its entry index), see
    `interference_series`.
    """
    rows = [{"module": boundary, "kind": kind_name(BOUNDARY_ERROR, stream), "step": k, "value": float(mse)}
            for k, entry in enumerate(entries) for boundary, streams in entry["errors"].items()
            for stream, mse in streams.items()]
    rows += [{"module": r["after"], "kind": kind_name(INTERFERENCE, stream), "step": r["index"], "value": value}
             for r in interference_series(entries, reconstructed) for stream, value in r["rise"].items()]
    return _frame(rows)


__all__ = ["BOUNDARY_ERROR", "INTERFERENCE", "LOSS", "NON_RECON_STREAMS", "OSCILLATION", "SIGN_CHANGES",
           "curve_steps", "interference", "interference_frame", "interference_series", "kind_name",
           "oscillation_frame", "oscillation_index", "slope_sign_changes", "smoothed_log_loss"]

"""Weights & Biases tracking: the only module that imports wandb, lazily, and never at the cost of a run.

`Tracker(mode)` with mode `offline` (the default: no account, no network; W&B writes the run under
`<directory>/wandb/offline-run-*`, syncable later with `wandb sync <that folder>`), `online`, or
`disabled` (nothing is imported or written). `start` logs the resolved config once and opens the run
(grouped by `group`, e.g. a sweep's study); `log_metrics` logs `split/metric` numbers; `log_curves` a
long-format table as a W&B Table plus a line plot with one line per series (e.g. module/stream);
`finish` closes the run and returns its W&B id (None when disabled).

Any W&B failure (wandb missing, `init` failing, no network, a bad key, a logging error) is logged as a
warning and the tracker degrades to disabled for the rest of the run: the run itself goes on.
While a run is open, `WANDB_MODE`, `WANDB_SILENT` and `WANDB_DIR` are set in the process environment
(so offline mode never prompts for a login and writes where it is told); `finish` restores them.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
ENV_KEYS = ("WANDB_MODE", "WANDB_SILENT", "WANDB_DIR")


class Tracker:
    """One W&B run at a time for one carsam run; every method is safe to call in any state."""

    def __init__(self, mode: str = "offline", project: str = "carsam", entity: str | None = None,
                 init_timeout: float = 60.0) -> None:
        if mode not in MODES:
            raise ValueError(f"tracking mode must be one of {MODES}, got '{mode}'")
        self.mode, self.project, self.entity, self.init_timeout = mode, project, entity, init_timeout
        self._run: Any = None
        self._saved_env: dict[str, str | None] | None = None

    @property
    def active(self) -> bool:
        """Whether a W&B run is open."""
        return self._run is not None

    def start(self, config: Mapping[str, Any], run_id: str, group: str | None = None,
              directory: str | Path | None = None) -> bool:
        """Open the W&B run named `run_id` with `config` (logged once); True if it opened.

        directory: where W&B writes (its `wandb/` folder goes inside; default `$WANDB_DIR`, else the
        working directory), normally the carsam run folder.
        """
        if self.mode == "disabled":
            return False
        if self.active:
            raise RuntimeError("Tracker.start called twice; call finish() first")
        folder = Path(directory or os.environ.get("WANDB_DIR") or ".").resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._set_env(folder)
            wandb = importlib.import_module("wandb")
            self._run = wandb.init(project=self.project, entity=self.entity, name=run_id, group=group,
                                   config=dict(config), dir=str(folder), mode=self.mode, reinit="create_new",
                                   settings=self._settings(wandb))
        except Exception as err:  # noqa: BLE001 - any W&B failure must not lose the run
            self._degrade("start", err)
            return False
        logger.info("W&B run %s (%s) under %s", self._run.id, self.mode, folder)
        return True

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log `split/metric` numbers (at `step` if given)."""
        self._guarded("log_metrics", lambda: self._run.log(dict(metrics), step=step))

    def log_curves(self, name: str, frame: pd.DataFrame, x: str = "step", y: str = "value",
                   series: Sequence[str] = ("module", "kind")) -> None:
        """Log a long-format `frame` as a W&B Table and a line plot `name` of `y` against `x`, one line per
        distinct combination of the `series` columns (joined with '/'), e.g. per module and stream."""
        self._guarded("log_curves", lambda: self._log_curves(name, frame, x, y, tuple(series)))

    def finish(self) -> str | None:
        """Close the run; its W&B id, or None if no run was open. Restores the W&B environment variables."""
        if not self.active:
            self._restore_env()
            return None
        run, self._run = self._run, None
        try:
            run.finish()
        except Exception as err:  # noqa: BLE001
            logger.warning("W&B finish failed (%s: %s); the local run files may be incomplete",
                           type(err).__name__, err)
        self._restore_env()
        return str(run.id)

    def _log_curves(self, name: str, frame: pd.DataFrame, x: str, y: str, series: tuple[str, ...]) -> None:
        wandb = importlib.import_module("wandb")
        data = frame[[x, y]].copy()
        data["series"] = frame[list(series)].astype(str).agg("/".join, axis=1) if series else name
        table = wandb.Table(dataframe=data.reset_index(drop=True))
        self._run.log({name: wandb.plot.line(table, x, y, stroke="series", title=name)})

    def _settings(self, wandb: Any) -> Any:
        """Quiet settings: no console capture, bounded init and login waits."""
        return wandb.Settings(silent=True, console="off", init_timeout=self.init_timeout,
                              login_timeout=self.init_timeout)

    def _guarded(self, what: str, call: Callable[[], None]) -> None:
        """Run `call` if a run is open; a failure degrades the tracker to disabled."""
        if not self.active:
            return
        try:
            call()
        except Exception as err:  # noqa: BLE001
            self._degrade(what, err)

    def _degrade(self, what: str, err: BaseException) -> None:
        """Warn, close whatever run is open (quietly), and stop tracking for the rest of this run."""
        logger.warning("W&B %s failed (%s: %s); tracking is disabled for this run", what, type(err).__name__, err)
        run, self._run, self.mode = self._run, None, "disabled"
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                logger.debug("W&B finish after a failure also failed", exc_info=True)
        self._restore_env()

    def _set_env(self, folder: Path) -> None:
        if self._saved_env is None:
            self._saved_env = {key: os.environ.get(key) for key in ENV_KEYS}
        os.environ.update({"WANDB_MODE": self.mode, "WANDB_SILENT": "true", "WANDB_DIR": str(folder)})

    def _restore_env(self) -> None:
        for key, value in (self._saved_env or {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = None


def attention_curves(frame: pd.DataFrame) -> pd.DataFrame:
    """Head-averaged attention rows of a diagnostics table: one value per (module, kind, layer), with
    `step` = layer, so each module/kind is one line over the decoder's layers."""
    from carsam.diagnostics.writer import head_means  # the diagnostics (and torch) only when there are some

    curves = head_means(frame)
    return curves.assign(step=curves["layer"])


def log_diagnostic_curves(tracker: Tracker, frame: pd.DataFrame) -> None:
    """Log a run's diagnostics table (`carsam.diagnostics.writer` format) as W&B line plots: per-layer
    attention entropy / KL / mask mass (`attention/curves`, one line per module and kind) and the
    reconstruction loss curves (`recon/loss`, one line per unit and stream)."""
    attention = attention_curves(frame)
    if len(attention):
        tracker.log_curves("attention/curves", attention)
    losses = frame[frame["kind"].str.startswith("loss/")]
    if len(losses):
        tracker.log_curves("recon/loss", losses)


__all__ = ["MODES", "Tracker", "attention_curves", "log_diagnostic_curves"]

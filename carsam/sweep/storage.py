"""Where a study lives: an Optuna storage from a URL, with heartbeats so a killed worker's trial is retried.

- an RDB URL: `sqlite:///runs/optuna.db` (the default), `postgresql+psycopg2://user@host:port/db`,
  `mysql+pymysql://...`: Optuna's `RDBStorage`;
- `journal:PATH` (or `journal:///abs/path`): Optuna's `JournalStorage` over an append-only file
  (`JournalFileBackend`), which several processes on one machine (or NFS) can share without a server.

Either way every running trial records a heartbeat every `heartbeat` seconds; before a worker starts a
trial it fails the study's trials whose last heartbeat is older than the grace period (2 x heartbeat),
and `RetryHeartbeatStaleTrialCallback` queues each such trial again (same parameters, at most
`MAX_RETRY` times). RDBStorage has this built in; Optuna 5's JournalStorage has no heartbeat, so
`HeartbeatJournalStorage` adds one, keeping the heartbeat as a trial system attribute. A worker killed
while appending to the journal leaves its lock file behind; the others break it after `lock_grace`
seconds (3 to 30, Optuna's default 30), and the journal's grace period is 2 x heartbeat + lock_grace, so
a worker whose heartbeat waited on such a lock is never taken for dead.
"""

from __future__ import annotations

import logging
import os
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from carsam.config import ConfigError

logger = logging.getLogger(__name__)

JOURNAL_PREFIX = "journal:"
HEARTBEAT_ENV = "CARSAM_SWEEP_HEARTBEAT"
DEFAULT_HEARTBEAT = 60  # seconds; a dead worker's trial is retried after 2 x this
MAX_RETRY = 3  # how many times one trial is queued again after its worker died
HEARTBEAT_ATTR = "carsam:heartbeat"  # the journal storage's heartbeat (Unix time), a trial system attribute
StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


def default_storage(runs_dir: str | Path, workers: int = 1) -> str:
    """SQLite in the runs folder for one worker; a journal file there for several (SQLite locks under
    concurrent writers)."""
    if workers > 1:
        return f"{JOURNAL_PREFIX}{Path(runs_dir) / 'optuna.journal'}"
    return f"sqlite:///{Path(runs_dir) / 'optuna.db'}"


def journal_path(url: str) -> Path | None:
    """The file of a `journal:PATH` (or `journal:///abs/path`) URL; None for any other URL."""
    if not url.startswith(JOURNAL_PREFIX):
        return None
    rest = url[len(JOURNAL_PREFIX):]
    if rest.startswith("//"):
        rest = rest[2:]
    if not rest:
        raise ConfigError(f"storage '{url}' names no file; use journal:PATH, e.g. journal:runs/optuna.journal")
    return Path(rest)


def heartbeat_interval(seconds: int | None = None) -> int:
    """`seconds`, else $CARSAM_SWEEP_HEARTBEAT, else 60; a positive whole number of seconds."""
    raw = seconds if seconds is not None else os.environ.get(HEARTBEAT_ENV, DEFAULT_HEARTBEAT)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"sweep heartbeat must be a whole number of seconds, got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"sweep heartbeat must be >= 1 second, got {value}")
    return value


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A JournalStorage whose running trials record a heartbeat (a system attribute) so that other
    workers can fail and retry the trials of a worker that died."""

    def __init__(self, backend: JournalFileBackend, *, heartbeat_interval: int, grace_period: int | None = None,
                 heartbeat_stale_trial_callback: StaleCallback | None = None) -> None:
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period or 2 * heartbeat_interval
        self._stale_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:  # another worker already failed it as stale
            logger.warning("trial %d was failed by another worker while running", trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running if now - _last_beat(t, now) > self._grace_period]

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> StaleCallback | None:
        return self._stale_callback


def _last_beat(trial: FrozenTrial, now: float) -> float:
    """A running trial's last heartbeat; its start when it died before the first one."""
    if HEARTBEAT_ATTR in trial.system_attrs:
        return float(trial.system_attrs[HEARTBEAT_ATTR])
    return trial.datetime_start.timestamp() if trial.datetime_start else now  # naive local time, as Optuna stores it


def _rdb_storage(url: str, heartbeat: int, retry: StaleCallback, attempts: int = 5) -> RDBStorage:
    """RDBStorage with heartbeats; retried a few times on database errors because workers starting together
    on a fresh database race to create Optuna's tables."""
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                              heartbeat_stale_trial_callback=retry)
        except ImportError as err:
            raise ConfigError(f"storage '{url}' needs a database driver that is not installed ({err.__cause__}); "
                              "PostgreSQL URLs use postgresql+psycopg2://") from err
        except sqlalchemy.exc.ArgumentError as err:
            raise ConfigError(f"storage '{url}' is not a database URL ({err}); use sqlite:///FILE, "
                              "postgresql+psycopg2://USER@HOST:PORT/DB or journal:FILE") from err
        except sqlalchemy.exc.SQLAlchemyError as err:
            if attempt == attempts - 1:
                first = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
                raise ConfigError(f"storage '{url}' cannot be used after {attempts} attempts ({type(err).__name__}: "
                                  f"{first}); check that the database server is up and the URL is right") from err
            logger.info("storage not ready (%s: %s); retrying", type(err).__name__, err)
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def open_storage(url: str, heartbeat: int | None = None) -> BaseStorage:
    """The Optuna storage for `url` (see the module docstring), with heartbeat and stale-trial retry."""
    interval = heartbeat_interval(heartbeat)
    with warnings.catch_warnings():  # heartbeats and the retry callback are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
        path = journal_path(url)
        if path is None:
            if url.startswith("sqlite:///"):
                Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            return _rdb_storage(url, interval, retry)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_grace = min(30, max(3, interval))
        backend = JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path), grace_period=lock_grace))
        return HeartbeatJournalStorage(backend, heartbeat_interval=interval, grace_period=2 * interval + lock_grace,
                                       heartbeat_stale_trial_callback=retry)

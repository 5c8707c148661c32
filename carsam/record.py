"""The run record: one folder per run holding `config.yaml` and `record.json`, written atomically.

`analysis/` and `carsam report` read only these files, so every number can be traced offline.

Liveness: while a run is `running`, its process (pid and host in `details.process`) rewrites
`runs/<run_id>/heartbeat` every `HEARTBEAT_SECONDS` (`Heartbeat`). A record still `running` whose heartbeat
is older than `STALE_SECONDS`, or whose process is gone from this host, was killed without a word (SIGKILL,
a crash, a lost machine): `effective_status` calls it `interrupted`, with when it was last alive. A run
stopped by SIGINT or SIGTERM writes `interrupted` itself.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import secrets
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

from carsam.files import write_text_atomic

logger = logging.getLogger(__name__)

RECORD_FILE = "record.json"
CONFIG_FILE = "config.yaml"
HEARTBEAT_FILE = "heartbeat"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 180.0  # six missed heartbeats
RUNNING, INTERRUPTED = "running", "interrupted"
RECORD_KEYS = ("run_id", "name", "method", "model", "w_bits", "a_bits", "prompts", "seed", "versions",
               "git_commit", "timings", "metrics", "status")


@dataclasses.dataclass
class RunRecord:
    """What one run did and measured. `metrics` keys are `split/metric` (e.g. `eval/mAP`)."""

    run_id: str
    name: str
    method: str
    model: dict[str, Any]
    w_bits: int
    a_bits: int
    prompts: str
    seed: int
    config: dict[str, Any]
    versions: dict[str, str]
    git_commit: str
    started_at: str
    status: str = "running"
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str = ""


def new_run_id(name: str) -> str:
    """A sortable, unique id: UTC timestamp, the run's name, and a short random suffix."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:48] or "run"
    return f"{stamp}-{safe}-{secrets.token_hex(3)}"


def write_record(run_dir: Path, record: RunRecord) -> Path:
    """Write `run_dir/record.json` atomically; returns its path."""
    path = Path(run_dir) / RECORD_FILE
    write_text_atomic(path, json.dumps(dataclasses.asdict(record), indent=2, sort_keys=False, allow_nan=True))
    return path


def read_record(run_dir: str | Path) -> dict[str, Any]:
    """The record of one run folder as a dict."""
    return json.loads((Path(run_dir) / RECORD_FILE).read_text())


def list_records(runs_dir: str | Path) -> list[dict[str, Any]]:
    """All readable records under `runs_dir`, oldest first; folders without a readable record are
    skipped (with a warning for an unreadable one, or one that is not a JSON object). A `running` record
    whose run is dead (`effective_status`) is returned as `interrupted`, its `status_note` saying since
    when; the file is left as it is."""
    root = Path(runs_dir)
    records = []
    for path in sorted(root.glob(f"*/{RECORD_FILE}")) if root.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            logger.warning("skipping unreadable run record %s (%s)", path, err)
            continue
        if not isinstance(record, dict):
            logger.warning("skipping run record %s: it holds a JSON %s, not an object", path, type(record).__name__)
            continue
        status, note = effective_status(record, path.parent)
        if status != record.get("status"):
            record = {**record, "status": status, "status_note": note}
        records.append(record)
    return records


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that change numbers."""
    from importlib import metadata

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("carsam", "torch", "torchvision", "segment-anything", "sam2", "hydra-core", "numpy", "pycocotools",
                 "lightning", "optuna"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def git_commit(repo: str | Path | None = None) -> str:
    """The current commit (with `-dirty` if the tree has changes), or 'unknown' outside git."""
    cwd = str(repo or Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal"], cwd=cwd,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def process_identity() -> dict[str, Any]:
    """`{"pid", "host"}` of this process (a running record's `details.process`)."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


class Heartbeat:
    """Rewrites `run_dir/heartbeat` (the UTC time, ISO) every `interval` seconds from a daemon thread, from
    `start()` until `stop()`; a context manager."""

    def __init__(self, run_dir: str | Path, interval: float = HEARTBEAT_SECONDS) -> None:
        self.path = Path(run_dir) / HEARTBEAT_FILE
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="carsam-heartbeat", daemon=True)

    def _touch(self) -> None:
        try:
            write_text_atomic(self.path, _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        except OSError as err:  # a full disk must not kill the run from this thread; the record will say it
            logger.warning("heartbeat %s not written (%s)", self.path, err)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self._touch()

    def start(self) -> Heartbeat:
        self._touch()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def last_alive(run_dir: str | Path) -> _dt.datetime | None:
    """When the run in `run_dir` last showed life: its heartbeat file's (else its record's) modification time."""
    for name in (HEARTBEAT_FILE, RECORD_FILE):
        path = Path(run_dir) / name
        if path.is_file():
            return _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc)
    return None


def effective_status(record: dict[str, Any], run_dir: str | Path) -> tuple[str, str]:
    """(status, note): the record's status, except that a `running` record whose process is gone (same host,
    pid not alive) or whose heartbeat is older than `STALE_SECONDS` is `interrupted`, with a note saying
    when it was last alive."""
    status = str(record.get("status", ""))
    if status != RUNNING:
        return status, ""
    seen = last_alive(run_dir)
    now = _dt.datetime.now(_dt.timezone.utc)
    process = (record.get("details") or {}).get("process") or {}
    gone = process.get("host") == socket.gethostname() and isinstance(process.get("pid"), int) \
        and not _process_alive(process["pid"])
    stale = seen is None or (now - seen).total_seconds() > STALE_SECONDS
    if gone or stale:
        when = seen.isoformat(timespec="seconds") if seen else "unknown"
        return INTERRUPTED, f"no heartbeat since {when}" + (" (its process is gone)" if gone else "")
    return status, ""

"""The run record: one folder per run holding `config.yaml` and `record.json`, written atomically.

`analysis/` and `carsam report` read only these files, so every number can be traced offline.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import platform
import secrets
import subprocess
from pathlib import Path
from typing import Any

from carsam.files import write_text_atomic

logger = logging.getLogger(__name__)

RECORD_FILE = "record.json"
CONFIG_FILE = "config.yaml"
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
    skipped (with a warning for an unreadable one)."""
    root = Path(runs_dir)
    records = []
    for path in sorted(root.glob(f"*/{RECORD_FILE}")) if root.is_dir() else []:
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            logger.warning("skipping unreadable run record %s (%s)", path, err)
    return records


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that change numbers."""
    from importlib import metadata

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("carsam", "torch", "torchvision", "segment-anything", "numpy", "pycocotools", "lightning",
                 "optuna"):
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

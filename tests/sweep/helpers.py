"""Helpers the tests import (plain functions and constants; the fixtures stay in conftest.py)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path

import optuna
import pytest

from tests.helpers import REPO, experiment

GRID_SPACE = '''
EXPERIMENT = "{experiment}"
GRID = {grid!r}
{extra}

def suggest(trial):
    return [f"{{k}}={{trial.suggest_categorical(k, v)}}" for k, v in GRID.items()]
'''


def write_space(folder: Path, grid: dict, name: str = "tiny_space", exp: str = "rtn_w8a8.yaml",
                extra: str = "") -> Path:
    """A space file over `grid` (queued point by point) starting from experiments/`exp`."""
    path = folder / f"{name}.py"
    path.write_text(GRID_SPACE.format(experiment=experiment(exp), grid=grid, extra=extra))
    return path


def write_tpe_space(folder: Path, name: str = "tpe_space") -> Path:
    """A space without GRID: the sampler picks quant.w_bits in {4, ..., 8} every trial (a completed value is
    never run twice, so a study of it completes at most 5 trials)."""
    path = folder / f"{name}.py"
    path.write_text(f'EXPERIMENT = "{experiment("rtn_w8a8.yaml")}"\n\n'
                    "def suggest(trial):\n"
                    "    return [f\"quant.w_bits={trial.suggest_categorical('quant.w_bits', [4, 5, 6, 7, 8])}\"]\n")
    return path


def sweep_command(space: Path, overrides: list[str], *args: str) -> list[str]:
    """`carsam sweep SPACE OVERRIDES... ARGS...` run by this interpreter."""
    return [sys.executable, "-m", "carsam.cli", "sweep", str(space), *overrides, "--no-progress", *args]


def sweep_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll `predicate` until it returns a truthy value (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user() -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` system user then."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    try:
        import pwd
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' system user to run the server as")
    if not runuser:
        pytest.skip("running as root without runuser to start PostgreSQL as the 'postgres' user")
    return [runuser, "-u", "postgres", "--"]

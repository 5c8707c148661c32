"""Sweep fixtures: tiny but real trials (RTN W8A8 on the small synthetic set: about a second each), space
files written into tmp folders, the `carsam sweep` command line, and a throwaway PostgreSQL server."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from tests.conftest import REPO, experiment, real_data_overrides

GRID_SPACE = '''
EXPERIMENT = "{experiment}"
GRID = {grid!r}
{extra}

def suggest(trial):
    return [f"{{k}}={{trial.suggest_categorical(k, v)}}" for k, v in GRID.items()]
'''


def write_space(folder: Path, grid: dict, name: str = "tiny_space", exp: str = "rtn_w8a8.yaml", extra: str = "") -> Path:
    """A space file over `grid` (queued point by point) starting from experiments/`exp`."""
    path = folder / f"{name}.py"
    path.write_text(GRID_SPACE.format(experiment=experiment(exp), grid=grid, extra=extra))
    return path


def write_tpe_space(folder: Path, name: str = "tpe_space") -> Path:
    """A space without GRID: the sampler picks quant.w_bits in {6, 8} every trial."""
    path = folder / f"{name}.py"
    path.write_text(f'EXPERIMENT = "{experiment("rtn_w8a8.yaml")}"\n\n'
                    "def suggest(trial):\n"
                    "    return [f\"quant.w_bits={trial.suggest_categorical('quant.w_bits', [6, 8])}\"]\n")
    return path


@pytest.fixture(autouse=True)
def quiet_optuna_restored():
    """Optuna at WARNING during a sweep test; its verbosity and the `carsam` log level (which `carsam sweep`
    lowers) as they were afterwards."""
    verbosity, level = optuna.logging.get_verbosity(), logging.getLogger("carsam").level
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(verbosity)
    logging.getLogger("carsam").setLevel(level)


@pytest.fixture(scope="session")
def trial_overrides(small_coco, random_testbed_checkpoint) -> list[str]:
    """Overrides that make one trial about a second on one core: 2 calibration and 2 evaluation images,
    min-max observers, no diagnostics, no W&B."""
    return [f"model.checkpoint={random_testbed_checkpoint}", *real_data_overrides(small_coco), "data.calib_size=2",
            "data.max_val_images=2", "quant.w_observer=minmax", "diagnostics.enabled=false", "tracking.mode=disabled"]


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


# --- PostgreSQL -----------------------------------------------------------------------------------------

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


@pytest.fixture(scope="module")
def postgres_url(request) -> str:
    """A PostgreSQL server on loopback in a tmp folder with an empty database; stopped afterwards."""
    pytest.importorskip("psycopg2", reason="psycopg2 (the PostgreSQL driver) is not installed")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl and shutil.which("psql")):
        pytest.skip("PostgreSQL server binaries not found (tools/system-packages.sh installs them)")
    prefix = _as_server_user()
    root = Path(tempfile.mkdtemp(prefix="carsam-pg-"))  # not under pytest's tmp: it is private to root
    if prefix:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(prefix + cmd, capture_output=True, text=True, timeout=60)

    done = run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    if done.returncode:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {done.stderr.strip()[-300:]}")

    def stop() -> None:
        run([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)

    request.addfinalizer(stop)
    done = run([pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "30",
                "-o", f"-k {root} -h 127.0.0.1 -p {port} -F", "start"])
    assert done.returncode == 0, f"pg_ctl start failed: {done.stderr}"
    subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", "CREATE DATABASE optuna"],
                   check=True, capture_output=True, timeout=30)
    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/optuna"

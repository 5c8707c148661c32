"""Sweep fixtures: tiny but real trials (RTN W8A8 on the small synthetic set: about a second each), space
files written into tmp folders, the `carsam sweep` command line, and a throwaway PostgreSQL server."""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest

from tests.helpers import real_data_overrides
from tests.sweep.helpers import (
    _as_server_user,
    _free_port,
    _pg_bin,
)


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

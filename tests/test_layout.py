"""The package layout shows the architecture and keeps its house rules: no hidden run state, no side effects
on import, W&B behind one module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "carsam"
PACKAGES = ("cache", "data", "diagnostics", "eval", "export", "methods", "models", "quant", "recon", "report", "sweep",
            "testbed")


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_top_level_holds_the_drivers_and_the_packages_only():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "cli.py", "config.py", "files.py", "pipeline.py", "record.py", "run_context.py",
                    "stats.py", "tracking.py"]
    assert all((PACKAGE / name / "__init__.py").is_file() for name in PACKAGES)


def test_no_context_variables_carry_run_state():
    offending = [p.relative_to(REPO) for p in _sources() if "contextvars" in p.read_text() or
                 "ContextVar" in p.read_text()]
    assert offending == []


def test_only_tracking_imports_wandb():
    importers = [p.relative_to(REPO) for p in _sources()
                 if any(line.strip().startswith(("import wandb", "from wandb")) for line in p.read_text().splitlines())]
    assert importers == []  # tracking.py imports it lazily, through importlib
    assert 'importlib.import_module("wandb")' in (PACKAGE / "tracking.py").read_text()


IMPORT_ALL = """
import importlib, logging, pkgutil, sys, torch
import carsam
before = (torch.get_rng_state().clone(), torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled(),
          len(logging.getLogger().handlers), sorted(logging.root.manager.loggerDict))
names = sorted(m.name for m in pkgutil.walk_packages(carsam.__path__, "carsam."))
for name in names:
    importlib.import_module(name)
after = (torch.get_rng_state(), torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled(),
         len(logging.getLogger().handlers))
assert torch.equal(before[0], after[0]), "the RNG state changed"
assert before[1:5] == after[1:], (before[1:5], after[1:])
print(len(names))
"""


def test_importing_every_module_changes_no_process_wide_state(tmp_path):
    done = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) > 50
    assert list(tmp_path.iterdir()) == []  # and it writes no file

"""Fake run folders for the dashboard tests: records (carsam.record) and hand-made diagnostics tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.report.dashboard.helpers import (
    write_fake_runs,
)


@pytest.fixture
def fake_runs(tmp_path: Path) -> dict:
    """`{"dir": tmp_path/runs, "records": {run_id: RunRecord}}` of `write_fake_runs`."""
    runs = tmp_path / "runs"
    return {"dir": runs, "records": write_fake_runs(runs)}

"""The W&B tracker: offline by default with no account or network, and never an exception that loses a run."""

from __future__ import annotations

import logging
import os
import sys
import types

import pandas as pd
import pytest

from carsam.tracking import Tracker

CURVES = pd.DataFrame({"module": ["u1", "u1", "u2", "u2"], "kind": ["loss/out"] * 4, "step": [0, 1, 0, 1],
                       "value": [1.0, 0.5, 2.0, 0.4]})


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """WANDB_DIR at tmp_path, no other W&B variable set."""
    for key in ("WANDB_MODE", "WANDB_SILENT", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    return tmp_path


def test_offline_tracker_writes_a_run_dir_and_returns_its_id(wandb_env):
    tracker = Tracker()
    assert tracker.mode == "offline"
    assert tracker.start({"method": "rtn", "quant": {"w_bits": 4}}, "20250101-000000-rtn-abc123", group="study")
    tracker.log_metrics({"eval/mAP": 0.25, "diag/entropy_gap_t2i": 0.01})
    tracker.log_curves("recon/loss", CURVES)
    wandb_id = tracker.finish()
    assert wandb_id and not tracker.active
    run_dirs = list((wandb_env / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(run_dirs) == 1 and (run_dirs[0] / f"run-{wandb_id}.wandb").is_file()
    assert os.environ["WANDB_DIR"] == str(wandb_env) and "WANDB_MODE" not in os.environ  # environment restored


def test_a_failing_init_degrades_to_a_warning(wandb_env, monkeypatch, caplog):
    import wandb

    def refuse(*args, **kwargs):
        raise RuntimeError("no network")
    monkeypatch.setattr(wandb, "init", refuse)
    tracker = Tracker(mode="online")
    with caplog.at_level(logging.WARNING, logger="carsam.tracking"):
        assert tracker.start({"a": 1}, "run") is False
    assert "no network" in caplog.text and tracker.mode == "disabled"
    tracker.log_metrics({"eval/mAP": 0.1})
    tracker.log_curves("recon/loss", CURVES)
    assert tracker.finish() is None
    assert "WANDB_MODE" not in os.environ


def test_missing_wandb_degrades_to_a_warning(wandb_env, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    tracker = Tracker()
    with caplog.at_level(logging.WARNING, logger="carsam.tracking"):
        assert tracker.start({}, "run") is False
    assert "import of wandb" in caplog.text and tracker.finish() is None


def test_a_failing_log_degrades_and_closes_the_run(wandb_env, monkeypatch, caplog):
    finished = []

    class FailingRun:
        id = "abc"

        def log(self, *args, **kwargs):
            raise ConnectionError("lost")

        def finish(self, exit_code=0):
            finished.append(exit_code)

    fake = types.SimpleNamespace(init=lambda **kwargs: FailingRun(), Settings=lambda **kwargs: kwargs)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = Tracker()
    assert tracker.start({}, "run")
    with caplog.at_level(logging.WARNING, logger="carsam.tracking"):
        tracker.log_metrics({"eval/mAP": 0.1})
    assert "lost" in caplog.text and not tracker.active and finished == [1]
    tracker.log_metrics({"eval/mAP": 0.2})  # a no-op now
    assert tracker.finish() is None


def test_disabled_mode_imports_nothing(wandb_env, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)
    tracker = Tracker(mode="disabled")
    with caplog.at_level(logging.WARNING, logger="carsam.tracking"):
        assert tracker.start({}, "run") is False
    assert not caplog.text and tracker.finish() is None


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="offline"):
        Tracker(mode="cloud")

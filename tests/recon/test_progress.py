"""Reconstruction progress bars: an overall bar (units done / total) and a per-unit step bar, drawn on a TTY only,
silent in logs and CI; the reconstruction itself is the same with or without them."""

from __future__ import annotations

import io

import torch

from carsam.config import ReconConfig
from carsam.recon.driver import UnitRecipe, reconstruct_units_
from carsam.recon.progress import ReconProgress
from carsam.recon.units import find_units


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_count_units_and_steps_on_a_terminal():
    out = _Terminal()
    progress = ReconProgress(3, enabled=True, file=out)
    for name in ("unit_a", "unit_b"):
        with progress.unit(name, 4) as on_step:
            for _ in range(4):
                on_step()
    progress.skip()
    progress.close()
    text = out.getvalue()
    assert progress.overall.n == 3 and progress.steps_done == 8
    assert "reconstruct" in text and "unit_a" in text and "unit_b" in text and "/4" in text


def test_bars_are_silent_off_a_terminal_and_when_disabled():
    for stream, enabled in ((io.StringIO(), True), (_Terminal(), False)):
        progress = ReconProgress(1, enabled=enabled, file=stream)
        with progress.unit("a", 2) as on_step:
            on_step()
            on_step()
        progress.close()
        assert stream.getvalue() == ""


def test_reconstruction_with_bars_equals_one_without(qsam, calib2):
    """Same seed, same unit: the bars only watch (the step callback runs after each optimiser step)."""
    import copy

    recon = ReconConfig(iters=6)
    units = find_units(qsam, "attention_mlp")[2:3]
    records = []
    for progress in (None, ReconProgress(len(units), enabled=True, file=_Terminal())):
        sam = copy.deepcopy(qsam)
        torch.manual_seed(0)
        records.append(reconstruct_units_(sam, calib2, recon, UnitRecipe(), units, progress=progress))
        if progress is not None:
            assert progress.overall.n == 1 and progress.steps_done == 6
    assert records[0][0]["curve"] == records[1][0]["curve"]

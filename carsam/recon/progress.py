"""Progress bars of a reconstruction: one for the whole run (units done / total, ETA) and one for the unit being
optimised (steps, ETA), drawn only on a terminal.

`ReconProgress(total_units, enabled)` is made by `reconstruct_model_` from `RunContext.progress` and passed down
as an argument. With `enabled` it asks tqdm to decide (`disable=None`): bars appear when the stream is a TTY
and stay silent in CI, pipes and log files, where the per-unit log lines (`recon <unit>: ... reconstruction
loss a -> b, rounding regulariser c -> d`) already say what happened.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

from tqdm import tqdm


class ReconProgress:
    """The overall bar and, while a unit runs, its step bar.

    Args:
        total_units: how many units the reconstruction will visit (restored and skipped ones included).
        enabled: draw bars (on a TTY only); False never draws.
        file: where to draw (default stderr); tests pass a stream of their own.
    """

    def __init__(self, total_units: int, enabled: bool, file: IO[str] | None = None) -> None:
        self.file = sys.stderr if file is None else file
        self.disable: bool | None = None if enabled else True
        self.steps_done = 0  # steps over all units, for callers and tests
        self.overall = tqdm(total=total_units, desc="reconstruct", unit="unit", position=0, file=self.file,
                            disable=self.disable, dynamic_ncols=True)

    @contextmanager
    def unit(self, name: str, steps: int) -> Iterator[Callable[[], None]]:
        """A step bar for unit `name` with `steps` steps; yields the callback to call after each step. The
        overall bar advances by one when the block ends."""
        bar = tqdm(total=steps, desc=name, unit="step", position=1, leave=False, file=self.file,
                   disable=self.disable, dynamic_ncols=True)
        def step() -> None:
            self.steps_done += 1
            bar.update(1)

        try:
            yield step
        finally:
            bar.close()
            self.overall.update(1)

    def skip(self, units: int = 1) -> None:
        """Count `units` that were not optimised (nothing quantized in them, or restored from the stage cache)."""
        self.overall.update(units)

    def close(self) -> None:
        self.overall.close()


__all__ = ["ReconProgress"]

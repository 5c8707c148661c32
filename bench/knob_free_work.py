"""Where a warm decoder-knob trial spends its time: the knob-free FP work the stage cache leaves, and the
knob-dependent stages no cache can skip (the bound quoted in docs/caching.md).

Runs the `bench/stage_cache.py` trial twice on a fresh cache folder (cold, then warm) and, in the warm
run, times with wrappers: each unit's FP capture pass (`carsam.recon.block_io._capture_pass` in FP mode),
MAC's FP phases (`carsam.methods.mac._phase("fp")`) and the interference's FP traces
(`FpTraces.states`). From the warm record: the reconstruction's optimisation time (sum of the units'
Lightning `seconds`), MAC's seconds and the evaluation time. Prints the bound `off / (warm - FP work)`
given the off time on the command line (`--off`, e.g. the median from `bench/stage_cache.py`).

    OMP_NUM_THREADS=1 .venv/bin/python bench/knob_free_work.py --off 47.6
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stage_cache import EXPERIMENT, TRIAL  # noqa: E402

import carsam.methods.mac as mac  # noqa: E402
import carsam.recon.block_io as recon_cache  # noqa: E402
import carsam.recon.interference as interference  # noqa: E402
from carsam import pipeline  # noqa: E402
from carsam.config import resolve  # noqa: E402
from carsam.quant.quantizers import QuantMode  # noqa: E402

FP_SECONDS = {"unit FP passes": 0.0, "MAC FP phases": 0.0, "interference FP traces": 0.0}


def _instrument() -> None:
    """Wrap the three FP-only pieces so that their wall time adds up in FP_SECONDS."""
    capture, phase, states = recon_cache._capture_pass, mac._phase, interference.FpTraces.states

    def timed_capture(sam: Any, unit: Any, calib: Any, mode: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return capture(sam, unit, calib, mode, *args, **kwargs)
        finally:
            if mode is QuantMode.FP:
                FP_SECONDS["unit FP passes"] += time.perf_counter() - start

    @contextlib.contextmanager
    def timed_phase(model: Any, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with phase(model, name):
            yield
        if name == mac.PHASES[0]:
            FP_SECONDS["MAC FP phases"] += time.perf_counter() - start

    def timed_states(self: Any, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return states(self, *args)
        finally:
            FP_SECONDS["interference FP traces"] += time.perf_counter() - start

    recon_cache._capture_pass, mac._phase, interference.FpTraces.states = timed_capture, timed_phase, timed_states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--off", type=float, help="seconds of the same trial without a cache")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides of the trial")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _instrument()
    with tempfile.TemporaryDirectory(prefix="carsam-bench-") as tmp:
        config = resolve(EXPERIMENT, [*TRIAL, *args.overrides, f"runs_dir={tmp}/runs", f"cache.dir={tmp}/cache"])
        pipeline.run(config)  # cold: fills the cache
        for name in FP_SECONDS:
            FP_SECONDS[name] = 0.0
        start = time.perf_counter()
        record = pipeline.run(config)
        warm = time.perf_counter() - start
    fp_work = sum(FP_SECONDS.values())
    optimisation = sum(unit["seconds"] for unit in record.details["recon"]["units"])
    steps = sum(unit["steps"] for unit in record.details["recon"]["units"])
    print(f"warm trial: {warm:.1f} s; knob-free FP work left: {fp_work:.2f} s ("
          + ", ".join(f"{k} {v:.2f} s" for k, v in FP_SECONDS.items()) + ")")
    print(f"knob-dependent, from the record: reconstruction optimisation {optimisation:.1f} s ({steps} steps, "
          f"{1000 * optimisation / max(steps, 1):.0f} ms per step), MAC {record.details['mac']['seconds']:.1f} s, "
          f"evaluation {record.timings['evaluate']:.1f} s")
    if args.off:
        print(f"bound on any cache: off / (warm - FP work) = {args.off:.1f} / {warm - fp_work:.1f} = "
              f"{args.off / (warm - fp_work):.2f}x")


if __name__ == "__main__":
    main()

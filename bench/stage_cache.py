"""One decoder-knob sweep trial on the testbed with a cold and with a warm stage cache (FP image embeddings
and PTQ4SAM's prepared quantized model).

The trial is what `make sweep` runs (`sweeps/carsam_quick.py`): CAR-SAM W4A4 with the image encoder in full
precision, 50 reconstruction steps per unit, 8 calibration and 60 val images, at one fixed point of its space
(diagnostics on, W&B off). Per repeat: a run with `cache.enabled=false` (off: every encoder pass and the preparation
run, as before stage caching), a run on an empty cache folder (cold: each image is encoded once and written, later
passes of the same run read it back; the preparation runs and is written), then the same run again (warm: every
embedding and the preparation are read back). The three runs must give identical metrics. Printed: wall and CPU
seconds (medians over repeats), the off/warm and cold/warm ratios, the per-stage timings of the records, the cache
counts and the seconds the caches spent on hits (key + read) and misses (key + compute + write): (hits + misses) x
the embedding miss cost is what the encoder costs the run, and the prepared miss seconds are what the preparation
costs it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/stage_cache.py --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from carsam import pipeline
from carsam.config import resolve

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "carsam_w4a4.yaml"
TRIAL = ["quant.quantize_encoder=false", "recon.iters=50", "data.calib_size=8", "data.max_val_images=60",
         "mac.strength=0.5", "mac.variant=both", "jcar.w_tokens=1.0", "jcar.grouping=pair", "tracking.mode=disabled"]


def timed_run(runs_dir: Path, cache_dir: Path, extra: list[str]) -> dict[str, Any]:
    """One pipeline run of the trial; its wall and CPU seconds, timings, cache counts and metrics."""
    config = resolve(EXPERIMENT, [*TRIAL, f"runs_dir={runs_dir}", f"cache.dir={cache_dir}", *extra])
    wall, cpu = time.perf_counter(), time.process_time()
    record = pipeline.run(config)
    details = record.details
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "timings": record.timings,
            "cache": details["cache"], "metrics": record.metrics,
            "recon_s": details.get("recon", {}).get("seconds"), "mac_s": details.get("mac", {}).get("seconds")}


def stage_line(name: str, run: dict[str, Any]) -> str:
    stages = ", ".join(f"{k} {v:.1f}" for k, v in run["timings"].items())
    cache = run["cache"]
    prepared = cache.get("prepared") or {}
    counts = (f"embeddings {cache['hits']} hits ({cache['hit_seconds']:.2f} s), {cache['misses']} misses "
              f"({cache['miss_seconds']:.2f} s); prepared {prepared.get('hits')} hits "
              f"({prepared.get('hit_seconds', 0):.2f} s), {prepared.get('misses')} misses "
              f"({prepared.get('miss_seconds', 0):.2f} s)") if cache.get("enabled") else "off"
    return f"  {name:4s}: {stages} | method: recon {run['recon_s']:.1f}, mac {run['mac_s']:.1f} | cache: {counts}"


def measure(repeats: int, overrides: list[str]) -> list[dict[str, dict[str, Any]]]:
    """`repeats` x (off, cold, warm) runs, each triple on a fresh cache folder; their metrics must agree."""
    results: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="carsam-bench-") as tmp:
        for i in range(repeats):
            cache_dir, runs_dir = Path(tmp) / f"cache{i}", Path(tmp) / "runs"
            triple = {"off": timed_run(runs_dir, cache_dir, [*overrides, "cache.enabled=false"]),
                      "cold": timed_run(runs_dir, cache_dir, overrides),
                      "warm": timed_run(runs_dir, cache_dir, overrides)}
            if len({tuple(sorted(r["metrics"].items())) for r in triple.values()}) != 1:
                raise SystemExit(f"metrics differ: {[r['metrics'] for r in triple.values()]}")
            results.append(triple)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="off/cold/warm triples (medians are printed)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides of the trial")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = measure(args.repeats, args.overrides)
    print(f"trial: {EXPERIMENT.name} {' '.join(TRIAL + args.overrides)}; threads: {torch.get_num_threads()}")
    for clock in ("wall", "cpu"):
        med = {name: statistics.median(r[name][clock] for r in results) for name in ("off", "cold", "warm")}
        listed = ", ".join("/".join(f"{r[n][clock]:.1f}" for n in ("off", "cold", "warm")) for r in results)
        print(f"{clock:4s}: off {med['off']:.1f} s, cold {med['cold']:.1f} s, warm {med['warm']:.1f} s; "
              f"off/warm {med['off'] / med['warm']:.2f}x, cold/warm {med['cold'] / med['warm']:.2f}x  "
              f"(runs off/cold/warm: {listed})")
    print("stages (s, last repeat; metrics identical in all runs):")
    for name in ("off", "cold", "warm"):
        print(stage_line(name, results[-1][name]))


if __name__ == "__main__":
    main()

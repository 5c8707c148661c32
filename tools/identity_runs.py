"""Fixed quick runs of every method, printed as one JSON of their metrics: the before/after check of a
change that must not change any number (e.g. a refactor).

    python tools/identity_runs.py --runs /tmp/ident_before > before.json
    ... change the code ...
    python tools/identity_runs.py --runs /tmp/ident_after > after.json
    diff before.json after.json        # empty: bit-identical metrics (floats printed with repr)

Each run: W4A4 testbed, 4 calibration images, 12 val images, 20 reconstruction steps per unit,
diagnostics on 2 images, W&B off; the stage cache on (cold, in a fresh folder) so its paths run too,
then the PTQ4SAM and CAR-SAM runs once more warm (their prepared model restored from the cache).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from carsam import pipeline
from carsam.config import resolve

TINY = ["data.calib_size=4", "data.max_val_images=12", "recon.iters=20", "diagnostics.images=2",
        "tracking.mode=disabled", "recon.interference_images=2"]
RUNS = [
    ("rtn", "experiments/rtn_w4a4.yaml", []),
    ("omse", "experiments/omse_w4a4.yaml", []),
    ("percentile", "experiments/percentile_w4a4.yaml", []),
    ("brecq", "experiments/brecq_w4a4.yaml", []),
    ("qdrop", "experiments/qdrop_w4a4_decoder_only.yaml", []),
    ("ptq4sam", "experiments/ptq4sam_w4a4.yaml", []),
    ("carsam", "experiments/carsam_w4a4.yaml", ["mac.variant=both"]),
    ("ptq4sam_warm", "experiments/ptq4sam_w4a4.yaml", []),
    ("carsam_warm", "experiments/carsam_w4a4.yaml", ["mac.variant=both"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="a fresh folder for the runs and their stage cache")
    parser.add_argument("--data", default="data", help="the synthetic dataset's root (shared by both sides)")
    parser.add_argument("--only", nargs="*", default=None, help="names of RUNS to do (default: all)")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every run (e.g. an older default, to check that only it moved)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out: dict[str, dict[str, float]] = {}
    for name, experiment, extra in RUNS:
        if args.only and name not in args.only:
            continue
        where = [f"runs_dir={args.runs}", f"data.synthetic_root={args.data}", f"name=ident_{name}"]
        config = resolve(experiment, [*TINY, *extra, *args.override, *where])
        record = pipeline.run(config)
        out[name] = {key: repr(value) for key, value in sorted(record.metrics.items())}
    print(json.dumps(out, indent=1, sort_keys=True))
    Path(args.runs, "identity.json").write_text(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()

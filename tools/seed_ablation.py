"""The CAR-SAM ablation over seeds (issue 13, item 6): PTQ4SAM (baseline), + MAC, + JCAR, + both, at W4A4
and W6A6, each over several seeds; every run scores both protocols (detector boxes: `eval/mAP`; GT boxes:
`eval/gt_box_mAP`, CAR-SAM's), so one quantized model serves both tables.

    python tools/seed_ablation.py run --runs /tmp/ablation --data data --seeds 0 1 2 --workers 2
    python tools/seed_ablation.py table --runs /tmp/ablation     # Markdown: mean ± std, paired deltas

`run` launches `carsam run experiments/carsam_<bits>.yaml` once per (bits, row, seed) as a subprocess, one
bit width per worker (so the rows of one bit width and seed reuse one prepared model from the stage
cache), each worker with `--threads` intra-op threads; runs already completed in `--runs` (same name)
are skipped, so an interrupted ablation resumes. `seed` sets the calibration subset (32 of the 64
calibration images) and the global RNG; `recon.seed` stays at its default.
`table` reads the records and prints, per bit width and protocol, each row's mean ± sample std over
seeds, and its paired difference to the baseline (the same seed, so the same calibration images).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd

from carsam.record import list_records

ROWS = {  # row name -> overrides on experiments/carsam_<bits>.yaml
    "baseline": ["mac.enabled=false", "jcar.enabled=false"],
    "mac": ["jcar.enabled=false"],
    "jcar": ["mac.enabled=false"],
    "both": [],
}
BITS = ("w4a4", "w6a6")
PROTOCOLS = {"eval/mAP": "detector boxes", "eval/gt_box_mAP": "GT boxes"}
CARSAM = str(Path(sys.executable).with_name("carsam"))  # the CLI of this environment


def run_name(bits: str, row: str, seed: int) -> str:
    return f"abl_{bits}_{row}_s{seed}"


def _completed(runs: Path) -> set[str]:
    return {r.get("name", "") for r in list_records(runs) if r.get("status") == "completed"} if runs.is_dir() else set()


def _worker(bits: str, args: argparse.Namespace, done: set[str], failures: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for seed in args.seeds:
        for row, overrides in ROWS.items():
            name = run_name(bits, row, seed)
            if name in done:
                continue
            command = [CARSAM, "run", f"experiments/carsam_{bits}.yaml",
                       f"runs_dir={args.runs}", f"data.synthetic_root={args.data}", "tracking.mode=disabled",
                       f"seed={seed}", f"name={name}", *overrides, "--no-progress"]
            print("carsam " + " ".join(command[1:]), flush=True)
            log = Path(args.runs, f"{name}.log")
            with log.open("w") as out:
                if subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    failures.append(f"{name} (log: {log})")


def run(args: argparse.Namespace) -> int:
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    done, failures = _completed(Path(args.runs)), []
    groups = [list(BITS)] if args.workers == 1 else [[b] for b in BITS]
    threads = [threading.Thread(target=lambda g=g: [_worker(b, args, done, failures) for b in g]) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


def ablation_frame(runs: Path) -> pd.DataFrame:
    """One row per completed ablation run: bits, row, seed, both protocols' mAP and mIoU (×100), run id."""
    rows = []
    for rec in list_records(runs):
        name = rec.get("name", "")
        if rec.get("status") != "completed" or not name.startswith("abl_"):
            continue
        _, bits, row, seed = name.split("_")
        metrics = rec["metrics"]
        rows.append({"bits": bits, "row": row, "seed": int(seed[1:]), "run_id": rec["run_id"],
                     **{key: 100 * metrics[key] for key in (*PROTOCOLS, "eval/mIoU")},
                     "threads": rec.get("details", {}).get("torch_threads"),
                     "minutes": rec.get("timings", {}).get("total", float("nan")) / 60})
    return pd.DataFrame(rows)


def _cell(values: pd.Series) -> str:
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}" if len(values) > 1 else f"{values.mean():.1f}"


def table(args: argparse.Namespace) -> int:
    frame = ablation_frame(Path(args.runs))
    if frame.empty:
        print(f"no completed ablation runs in {args.runs}", file=sys.stderr)
        return 1
    lines = []
    for metric, protocol in PROTOCOLS.items():
        lines += [f"\n**{protocol}** (`{metric}`, ×100; mean ± sample std over seeds; Δ: paired, same seed)\n",
                  "| row | " + " | ".join(f"{b.upper()} mAP | {b.upper()} Δ vs baseline" for b in BITS) + " | n |",
                  "|---|" + "---|---|" * len(BITS) + "---|"]
        for row in ROWS:
            cells, n = [], 0
            for bits in BITS:
                part = frame[(frame["bits"] == bits) & (frame["row"] == row)].set_index("seed")[metric]
                base = frame[(frame["bits"] == bits) & (frame["row"] == "baseline")].set_index("seed")[metric]
                delta = (part - base).dropna()
                cells += [_cell(part) if len(part) else "—", "—" if row == "baseline" or delta.empty else _cell(delta)]
                n = max(n, len(part))
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {n} |")
    print("\n".join(lines))
    if args.runs_list:
        listing = frame.sort_values(["bits", "row", "seed"])
        print("\n| " + " | ".join(listing.columns) + " |\n|" + "---|" * len(listing.columns))
        for values in listing.itertuples(index=False):
            print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in values) + " |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="run (or resume) the ablation")
    go.add_argument("--runs", required=True, help="the runs folder (its .cache is the shared stage cache)")
    go.add_argument("--data", default="data", help="the synthetic dataset's root")
    go.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    go.add_argument("--workers", type=int, choices=(1, 2), default=2, help="2: one bit width per worker")
    go.add_argument("--threads", type=int, default=1, help="intra-op threads per run (recorded)")
    show = sub.add_parser("table", help="print the ablation tables from the records")
    show.add_argument("--runs", required=True)
    show.add_argument("--runs-list", action="store_true", help="also list every run (id, seed, metrics)")
    args = parser.parse_args()
    return run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    raise SystemExit(main())

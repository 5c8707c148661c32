"""The CAR-SAM ablation over seeds (issues 13, 14, 18): reference rows (FP, RTN, OMSE, BRECQ, QDrop),
PTQ4SAM (baseline), + MAC, + JCAR (and its granularities), + both, at chosen bit widths, each over several
seeds; every run scores both protocols (detector boxes: `eval/mAP`; GT boxes: `eval/gt_box_mAP`, CAR-SAM's), so one
quantized model serves both tables.

    python tools/seed_ablation.py run --runs /tmp/ablation --data data --seeds 0 1 2 --workers 2
    python tools/seed_ablation.py run --runs /tmp/v2 --rows fp rtn brecq baseline --bits w4a4 \
        --set model.checkpoint=build/testbed_v2/testbed_sam.pth data.prompt_source=gt_boxes
    python tools/seed_ablation.py table --runs /tmp/ablation     # Markdown: mean ± std, paired deltas

`run` launches `carsam run EXPERIMENT quant.w_bits=W quant.a_bits=A ...` once per (bits, row, seed) as a
subprocess, named `abl_<bits>_<row>_s<seed>`. The (bits, seed) groups are shared out among `--workers`
threads; a group's rows run one after another, so they reuse one prepared model from the stage cache. Each
run gets `--threads` intra-op threads and the `--set` overrides (after the row's own). Runs already completed
in `--runs` (same name) are skipped, so an interrupted ablation resumes; the `fp` row runs for the first
seed only (nothing in it depends on the seed). `seed` sets the calibration subset
(`data.calib_size` of the calibration images) and the global RNG; `recon.seed` stays at its default.
`table` reads the records and prints, per bit width and protocol, each row's mean ± sample std over seeds,
its share of FP (when an `fp` row exists), and its paired difference to the baseline (the same seed, so the
same calibration images).
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd

from carsam.record import list_records

CARSAM_OFF = ["mac.enabled=false", "jcar.enabled=false"]
ROWS = {  # row name -> (experiment file, overrides); bits are set by quant.w_bits / quant.a_bits
    "fp": ("experiments/fp.yaml", []),
    "rtn": ("experiments/rtn_w4a4.yaml", []),
    "omse": ("experiments/omse_w4a4.yaml", []),
    "brecq": ("experiments/brecq_w4a4.yaml", []),
    "qdrop": ("experiments/qdrop_w4a4.yaml", []),
    "baseline": ("experiments/carsam_w4a4.yaml", CARSAM_OFF),  # PTQ4SAM
    "mac": ("experiments/carsam_w4a4.yaml", ["jcar.enabled=false"]),
    "jcar": ("experiments/carsam_w4a4.yaml", ["mac.enabled=false"]),  # carsam's default grouping (chain)
    "jcar_pair": ("experiments/carsam_w4a4.yaml", ["mac.enabled=false", "jcar.grouping=pair"]),
    "jcar_block": ("experiments/carsam_w4a4.yaml", ["mac.enabled=false", "jcar.grouping=block"]),
    "jcar_decoder": ("experiments/carsam_w4a4.yaml", ["mac.enabled=false", "jcar.grouping=decoder"]),
    "both": ("experiments/carsam_w4a4.yaml", []),
}
DEFAULT_ROWS = ("baseline", "mac", "jcar", "both")
DEFAULT_BITS = ("w4a4", "w6a6")
PROTOCOLS = {"eval/mAP": "detector boxes", "eval/gt_box_mAP": "GT boxes"}
CARSAM = str(Path(sys.executable).with_name("carsam"))  # the CLI of this environment
BITS_RE = re.compile(r"^w(\d+)a(\d+)$")
NAME_RE = re.compile(r"^abl_(w\d+a\d+)_(.+)_s(\d+)$")


def run_name(bits: str, row: str, seed: int) -> str:
    return f"abl_{bits}_{row}_s{seed}"


def bit_overrides(bits: str) -> list[str]:
    """`w4a3` -> the quant.w_bits / quant.a_bits overrides."""
    match = BITS_RE.match(bits)
    if match is None:
        raise SystemExit(f"seed_ablation: error: bits must look like w4a4, got '{bits}'")
    return [f"quant.w_bits={match.group(1)}", f"quant.a_bits={match.group(2)}"]


def _completed(runs: Path) -> set[str]:
    return {r.get("name", "") for r in list_records(runs) if r.get("status") == "completed"} if runs.is_dir() else set()


def _run_group(bits: str, seed: int, args: argparse.Namespace, done: set[str], failures: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for row in args.rows:
        name = run_name(bits, row, seed)
        if name in done or (row == "fp" and seed != args.seeds[0]):  # FP does not depend on the seed
            continue
        experiment, overrides = ROWS[row]
        command = [CARSAM, "run", experiment, f"runs_dir={args.runs}", f"data.synthetic_root={args.data}",
                   "tracking.mode=disabled", f"seed={seed}", f"name={name}", *bit_overrides(bits), *overrides,
                   *args.set, "--no-progress"]
        print("carsam " + " ".join(command[1:]), flush=True)
        log = Path(args.runs, f"{name}.log")
        with log.open("w") as out:
            if subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                failures.append(f"{name} (log: {log})")


def run(args: argparse.Namespace) -> int:
    for bits in args.bits:
        bit_overrides(bits)  # a malformed width fails before any run
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    done, failures = _completed(Path(args.runs)), []
    groups: queue.Queue[tuple[str, int]] = queue.Queue()
    for bits, seed in itertools.product(args.bits, args.seeds):
        groups.put((bits, seed))

    def worker() -> None:
        while True:
            try:
                bits, seed = groups.get_nowait()
            except queue.Empty:
                return
            _run_group(bits, seed, args, done, failures)

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
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
        match = NAME_RE.match(name)
        if match is None:
            continue
        bits, row, seed = match.groups()
        metrics = rec["metrics"]
        rows.append({"bits": bits, "row": row, "seed": int(seed), "run_id": rec["run_id"],
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
    bit_widths = [b for b in dict.fromkeys(frame["bits"]) if b != "w32a32"]
    rows = [r for r in ROWS if r in set(frame["row"])]
    lines = []
    for metric, protocol in PROTOCOLS.items():
        lines += [f"\n**{protocol}** (`{metric}`, ×100; mean ± sample std over seeds; % FP: of the FP row's mean; "
                  "Δ: paired, same seed)\n",
                  "| row | " + " | ".join(f"{b.upper()} mAP | % FP | Δ vs baseline" for b in bit_widths) + " | n |",
                  "|---|" + "---|---|---|" * len(bit_widths) + "---|"]
        for row in rows:
            cells, n = [], 0
            for bits in bit_widths:
                part = frame[(frame["bits"] == bits) & (frame["row"] == row)].set_index("seed")[metric]
                base = frame[(frame["bits"] == bits) & (frame["row"] == "baseline")].set_index("seed")[metric]
                fp = frame[(frame["bits"] == bits) & (frame["row"] == "fp")][metric]
                delta = (part - base).dropna()
                share = f"{100 * part.mean() / fp.mean():.0f}%" if len(part) and len(fp) else "—"
                cells += [_cell(part) if len(part) else "—", share,
                          "—" if row in ("baseline", "fp") or delta.empty else _cell(delta)]
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
    go.add_argument("--workers", type=int, default=2, help="parallel runs ((bits, seed) groups shared out)")
    go.add_argument("--threads", type=int, default=1, help="intra-op threads per run (recorded)")
    go.add_argument("--bits", nargs="+", default=list(DEFAULT_BITS), help="bit widths, e.g. w4a4 w4a3")
    go.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=list(ROWS), help="rows to run")
    go.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    show = sub.add_parser("table", help="print the ablation tables from the records")
    show.add_argument("--runs", required=True)
    show.add_argument("--runs-list", action="store_true", help="also list every run (id, seed, metrics)")
    args = parser.parse_args()
    return run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    raise SystemExit(main())

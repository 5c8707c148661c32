"""The GPU check's measurement part: PTQ4SAM and CAR-SAM W4A4 on a random-init vit_b with a reduced budget, per-unit
time and peak GPU memory, extrapolated to the paper budget. `bench/gpu_check.sh` runs it after the `gpu` tests.

Random-init vit_b (its state dict saved once under OUT), the testbed's synthetic images (resized to 1024 px by
SAM's preprocessing), `--calib` calibration and `--val` validation images, `--iters` steps per unit. The mAP of a
random-init model means nothing; what is measured is time and memory. The extrapolation is linear in steps:
seconds per step of each unit, summed over the units, times the paper budget's steps per unit (PTQ4SAM: 20,000;
CAR-SAM's notes: 140,000 joint steps per unit).

    python bench/gpu_check.py --out OUT [--iters 100] [--calib 4] [--val 4]
    python bench/gpu_check.py --out /tmp/rehearsal --device cpu --model testbed --iters 2 --calib 2 --val 2
                                                   (a CPU rehearsal of the code path; its times mean nothing)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from carsam import pipeline
from carsam.config import resolve
from carsam.models.sam import build_random_model

ROOT = Path(__file__).resolve().parent.parent
PAPER_STEPS = {"ptq4sam": 20_000, "carsam": 140_000}
EXPERIMENTS = {"ptq4sam": "experiments/ptq4sam_w4a4.yaml", "carsam": "experiments/carsam_w4a4.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--calib", type=int, default=4)
    parser.add_argument("--val", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="vit_b", help="vit_b (random init) or testbed (the shipped one)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    model = [f"model.type={args.model}"]
    if args.model != "testbed":
        checkpoint = args.out / f"{args.model}_random.pth"
        if not checkpoint.exists():
            torch.manual_seed(0)
            torch.save(build_random_model(args.model).state_dict(), checkpoint)
        model.append(f"model.checkpoint={checkpoint}")
    rows = []
    for method, path in EXPERIMENTS.items():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        config = resolve(str(ROOT / path), [
            f"runs_dir={args.out / 'runs'}", *model, f"device={args.device}",
            f"data.synthetic_root={args.out / 'data'}", f"data.calib_size={args.calib}",
            f"data.max_val_images={args.val}", f"recon.iters={args.iters}", "diagnostics.enabled=false",
            "output.save_model=false", "tracking.mode=disabled", f"name=gpu_check_{method}"])
        record = pipeline.run(config)
        units = record.details["recon"]["units"]
        per_step = sum(u["seconds"] / max(1, u["steps"]) for u in units)
        rows.append({"method": method, "run_id": record.run_id, "units": len(units), "iters": args.iters,
                     "recon_seconds": record.details["recon"]["seconds"],
                     "seconds_per_unit": [round(u["seconds"], 2) for u in units],
                     "peak_cuda_mb": record.details.get("peak_cuda_mb"),
                     "total_seconds": record.timings.get("total"),
                     "paper_steps_per_unit": PAPER_STEPS[method],
                     "extrapolated_hours": round(per_step * PAPER_STEPS[method] / 3600, 2),
                     "device": torch.cuda.get_device_name() if cuda else "cpu"})
    (args.out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    lines = ["| method | units | steps/unit | recon s | peak GPU MiB | paper steps/unit | extrapolated h |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['units']} | {r['iters']} | {r['recon_seconds']:.0f} | {r['peak_cuda_mb']} | "
              f"{r['paper_steps_per_unit']:,} | {r['extrapolated_hours']} |" for r in rows]
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

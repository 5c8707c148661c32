"""Per-step overhead of the Lightning reconstruction stage against a plain torch loop, on one unit.

The shipped testbed, quantized W4A4 (`quantize_` + `calibrate_` on a few calibration images of the
synthetic set), one decoder unit with AdaRound on its Linears, learnable activation scales and QDrop
(p = 0.5): the full per-step work of QDrop/PTQ4SAM. Each driver runs `--steps` steps from the same
starting state (weights restored between runs), `--repeats` times, alternating; medians are printed.
Wall time includes each driver's setup (Trainer construction and fit start-up for Lightning).

    OMP_NUM_THREADS=1 .venv/bin/python bench/recon_overhead.py --steps 300
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from carsam.config import ReconConfig, resolve
from carsam.methods.calibrate import calibrate_
from carsam.models.quantize import quantize_
from carsam.models.sam import build_model
from carsam.pipeline import load_datasets, resolve_device
from carsam.recon.block_io import capture_block_io
from carsam.recon.driver import UnitRecipe, prepare_unit_
from carsam.recon.stage import ReconSettings, reconstruct_unit, reconstruct_unit_plain
from carsam.recon.units import find_units


def prepare(unit_index: int, calib_images: int, device: torch.device):
    config = resolve()
    calib = load_datasets(config.data, config.seed).calib.subset(calib_images, seed=0)
    sam = build_model("testbed").to(device)
    quantize_(sam, config.quant)
    calibrate_(sam, calib)
    unit = find_units(sam, "attention_mlp")[unit_index]
    block_io = capture_block_io(sam, unit, calib, inputs="quantized")
    module = unit.module(sam)
    prepare_unit_(module, UnitRecipe(learn_act_scales=True, quant_prob=0.5))  # PTQ4SAM's / QDrop's recipe
    return sam, unit, block_io


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unit", type=int, default=1, help="index in the attention_mlp grouping (1: layer 0 t2i)")
    parser.add_argument("--calib-images", type=int, default=4)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    sam, unit, block_io = prepare(args.unit, args.calib_images, device)
    start_state = copy.deepcopy(unit.module(sam).state_dict())
    settings = ReconSettings.from_config(ReconConfig(iters=args.steps))
    for fn in (reconstruct_unit_plain, reconstruct_unit):  # warm-up: first-call costs out of the timings
        unit.module(sam).load_state_dict(start_state)
        fn(sam, unit, block_io, ReconSettings.from_config(ReconConfig(iters=10)))
    times: dict[str, list[float]] = {"plain": [], "lightning": []}
    curves = {}
    for _ in range(args.repeats):
        for name, fn in (("plain", reconstruct_unit_plain), ("lightning", reconstruct_unit)):
            unit.module(sam).load_state_dict(start_state)
            result = fn(sam, unit, block_io, settings)
            times[name].append(result.seconds_per_step)
            curves[name] = result.curve["total"]
    plain, light = statistics.median(times["plain"]), statistics.median(times["lightning"])
    max_diff = max(abs(a - b) for a, b in zip(curves["plain"], curves["lightning"]))
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"threads: {torch.get_num_threads()}")
    print(f"unit: {unit.name}; block_io: {len(block_io)} samples, {block_io.num_prompts} boxes, "
          f"{block_io.nbytes / 2**20:.1f} MiB; steps: {args.steps} x {args.repeats} repeats")
    print(f"plain loop : {plain * 1e3:.3f} ms/step  (runs: {', '.join(f'{t * 1e3:.3f}' for t in times['plain'])})")
    print(f"lightning  : {light * 1e3:.3f} ms/step  (runs: {', '.join(f'{t * 1e3:.3f}' for t in times['lightning'])})")
    print(f"ratio lightning / plain: {light / plain:.3f}x (target <= 1.15x)")
    print(f"max |loss difference| between the two curves: {max_diff:.3g}")


if __name__ == "__main__":
    main()

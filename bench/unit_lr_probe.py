"""Hard-rounded loss of one decoder reconstruction unit from its RTN start, for one AdaRound setting.

The `recon.alpha_lr` evidence of docs/results.md: the shipped testbed, W4A4 with MSE activation ranges, decoder
quantized only; unit `UNIT` of the `attention_mlp` grouping (1: layers.0 token->image, 2: layers.0 MLP,
3: layers.0 image->token) reconstructed for ITERS steps (BRECQ: AdaRound only) at AdaRound lr LR;
prints the unit's mean MSE on its block_io before (RTN) and after (hard rounding).

    OMP_NUM_THREADS=1 .venv/bin/python bench/unit_lr_probe.py UNIT ITERS LR
"""

from __future__ import annotations

import sys
import time

import torch

from carsam.config import ReconConfig, resolve
from carsam.methods.calibrate import quantize_calibrate_
from carsam.pipeline import load_datasets
from carsam.recon.block_io import block_io_loss, capture_block_io
from carsam.recon.driver import UnitRecipe, reconstruct_model_
from carsam.recon.units import find_units
from carsam.run_context import RunContext
from carsam.testbed.shipped import TESTBED_CHECKPOINT
from carsam.testbed.spec import build_testbed_from_checkpoint


def main(unit_index: int, iters: int, alpha_lr: float) -> None:
    config = resolve(None, ["method=brecq", "quant.a_observer=mse", "quant.quantize_encoder=false"])
    calib = load_datasets(config.data, config.seed).calib
    torch.manual_seed(0)
    sam = build_testbed_from_checkpoint(TESTBED_CHECKPOINT)
    quantize_calibrate_(sam, calib, config, RunContext())
    unit = find_units(sam, "attention_mlp")[unit_index]
    block_io = capture_block_io(sam, unit, calib, inputs="quantized")
    rtn = block_io_loss(sam, block_io)
    start = time.perf_counter()
    reconstruct_model_(sam, calib, ReconConfig(iters=iters, alpha_lr=alpha_lr, track_interference=False),
                       UnitRecipe(), units=[unit])
    print(f"{unit.name} iters={iters} alpha_lr={alpha_lr}: RTN {rtn:.5f} -> {block_io_loss(sam, block_io):.5f} "
          f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))

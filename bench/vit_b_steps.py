"""Per-step cost of reconstruction at SAM-B's real shapes, and the block I/O bytes per unit (issue 17).

A random-init vit_b (the shapes are what matter: 1024 px, 64x64 image tokens of 768 channels in the encoder,
256 in the decoder), quantized W4A4 by `quantize_`. Three units, each fed synthetic inputs of the shapes SAM
gives it (no encoder pass: a vit_b encoder pass costs about 35 s on this CPU):
- an image-encoder block (`encoder_block` 0: windowed attention + MLP on (1, 64, 64, 768));
- a decoder attention (`attention_mlp` 1: layer 0's token->image attention, q (B, 7, 256), k/v (B, 4096, 256));
- a JCAR pair (`pair` 1: layer 0's token->image attention, MLP and image->token attention as one unit).
B is the boxes per image (`--boxes`, default 7, PTQ4SAM's detector gives about that many on COCO).

For each unit, side by side in one process, the same number of steps from the same start:
- **FP step:** the FP unit, forward + MSE + backward + Adam on its weights (what one training step costs);
- **fake-quant, reference / fused:** carsam's reconstruction step (AdaRound on the weights, learned
  activation scales, QDrop p = 0.5), `reconstruct_unit_plain`, with the quantizers' reference composite
  (`UniformQuantizer.fused = False`) and with `fused_fake_quantize`;
- **Lightning stage:** the same step through `reconstruct_unit` (fused), the path `carsam run` takes.
The median over `--repeats` of each driver's seconds per step; ratios are against the FP step.

Then the block I/O bytes a run keeps per unit for 32 calibration images at 7 and 100 boxes per image
(one sample's tensors times 32; fp32 and the fp16 storage option), and the peak memory of one reconstruction step
of the decoder attention at 7, 50 and 100 boxes per image, with `recon.max_boxes_per_step` (`--chunk`, default 16)
and without a bound (`carsam.recon.memory.peak_allocated_bytes`: the profiler's replay on the CPU).

    OMP_NUM_THREADS=1 .venv/bin/python bench/vit_b_steps.py --steps 4 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from carsam.config import ReconConfig
from carsam.models.quantize import QuantConfig, quantize_
from carsam.models.sam import build_random_model
from carsam.quant.quantizers import QuantMode, UniformQuantizer
from carsam.quant.state import set_quant_mode
from carsam.recon.block_io import BlockIO, UnitSample
from carsam.recon.driver import UnitRecipe, prepare_unit_
from carsam.recon.memory import peak_allocated_bytes
from carsam.recon.stage import ReconSettings, reconstruct_unit, reconstruct_unit_plain
from carsam.recon.units import ReconUnit, find_units

TOKENS = 7  # SAM's decoder tokens per box: IoU token + 4 mask tokens + 2 box-corner embeddings
IMAGE_TOKENS, DECODER_DIM, ENCODER_DIM = 64 * 64, 256, 768
CALIB_IMAGES = 32
UNITS = (("encoder block", "encoder_block", 0), ("decoder attention", "attention_mlp", 1), ("JCAR pair", "pair", 1))


def unit_inputs(kind: str, boxes: int, gen: torch.Generator) -> tuple[tuple[Tensor, ...], dict]:
    """Synthetic inputs of SAM-B's shapes for a unit of grouping `kind` (`boxes` prompts on one image)."""
    if kind == "encoder_block":
        return (torch.randn(1, 64, 64, ENCODER_DIM, generator=gen),), {}
    tokens = torch.randn(boxes, TOKENS, DECODER_DIM, generator=gen) * 4  # SAM's tokens are several times wider
    image = torch.randn(boxes, IMAGE_TOKENS, DECODER_DIM, generator=gen)
    if kind == "attention_mlp":
        return (tokens, image, image), {}
    return (tokens, image, tokens.clone(), torch.randn(boxes, IMAGE_TOKENS, DECODER_DIM, generator=gen)), {}


def prepare(sam: nn.Module, unit: ReconUnit, grouping: str, boxes: int, seed: int) -> BlockIO:
    """Calibrate the unit's quantizers on one synthetic sample, set up PTQ4SAM's trainables, return its block I/O
    (the FP outputs as targets)."""
    module = unit.module(sam)
    args, kwargs = unit_inputs(grouping, boxes, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        set_quant_mode(module, QuantMode.FP)
        targets = unit.run(module, args, kwargs)
        set_quant_mode(module, QuantMode.CALIBRATE)
        unit.run(module, args, kwargs)
    set_quant_mode(module, QuantMode.QUANTIZED)
    prepare_unit_(module, UnitRecipe(learn_act_scales=True, quant_prob=0.5))  # PTQ4SAM's / QDrop's recipe
    return BlockIO(unit, [UnitSample(args, kwargs, targets)])


def fp_seconds_per_step(module: nn.Module, unit: ReconUnit, block_io: BlockIO, steps: int) -> float:
    """Seconds per FP training step of the unit: forward + MSE against the targets + backward + Adam."""
    sample = block_io.sample(0)
    params = [p for p in module.parameters() if p.dtype.is_floating_point]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=1e-6)
    with torch.enable_grad():
        set_quant_mode(module, QuantMode.FP)
        start = time.perf_counter()
        for _ in range(steps):
            outs = unit.run(module, sample.args, sample.kwargs)
            loss = sum(nn.functional.mse_loss(o, t) for o, t in zip(outs, sample.targets))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()
        seconds = (time.perf_counter() - start) / steps
        set_quant_mode(module, QuantMode.QUANTIZED)
    for p, flag in zip(params, saved):
        p.requires_grad_(flag)
    return seconds


def set_fused(module: nn.Module, fused: bool) -> None:
    for m in module.modules():
        if isinstance(m, UniformQuantizer):
            m.fused = fused


def time_unit(sam: nn.Module, unit: ReconUnit, block_io: BlockIO, steps: int, repeats: int) -> dict[str, float]:
    module = unit.module(sam)
    start_state = copy.deepcopy(unit.module(sam).state_dict())
    settings = ReconSettings.from_config(ReconConfig(iters=steps))
    drivers: dict[str, Callable[[], float]] = {
        "fp": lambda: fp_seconds_per_step(module, unit, block_io, steps),
        "reference": lambda: _recon(sam, unit, block_io, settings, False, reconstruct_unit_plain),
        "fused": lambda: _recon(sam, unit, block_io, settings, True, reconstruct_unit_plain),
        "lightning": lambda: _recon(sam, unit, block_io, settings, True, reconstruct_unit),
    }
    times: dict[str, list[float]] = {name: [] for name in drivers}
    for _ in range(repeats):  # alternate the drivers, so that load on the machine hits them alike
        for name, driver in drivers.items():
            unit.module(sam).load_state_dict(start_state)
            times[name].append(driver())
    return {name: statistics.median(values) for name, values in times.items()}


def _recon(sam: nn.Module, unit: ReconUnit, block_io: BlockIO, settings: ReconSettings, fused: bool,
           driver: Callable) -> float:
    set_fused(unit.module(sam), fused)
    return float(driver(sam, unit, block_io, settings).seconds_per_step)


def block_io_bytes(unit: ReconUnit, kind: str, boxes: int, dtype: torch.dtype) -> int:
    """Bytes of the block I/O for `CALIB_IMAGES` images at `boxes` boxes each: inputs plus FP targets."""
    args, _ = unit_inputs(kind, boxes, torch.Generator().manual_seed(0))
    element = torch.finfo(dtype).bits // 8
    if kind == "encoder_block":
        per_image = 2 * args[0].numel()  # input and target, both (1, 64, 64, 768)
    elif kind == "attention_mlp":
        per_image = sum(a.numel() for a in args) + args[0].numel()  # q, k, v + the (B, 7, 256) target
    else:
        per_image = sum(a.numel() for a in args) + args[0].numel() + args[1].numel()  # + queries and keys targets
    return per_image * element * CALIB_IMAGES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--boxes", type=int, default=7, help="boxes per image in the timed decoder units")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=16, help="recon.max_boxes_per_step for the memory table")
    parser.add_argument("--skip-timing", action="store_true", help="only the bytes and memory tables")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    sam = build_random_model("vit_b").eval()
    quantize_(sam, QuantConfig())
    print(f"random-init vit_b, W4A4; threads: {torch.get_num_threads()}; {args.steps} steps x {args.repeats} repeats "
          f"per driver, medians (absolute times are this machine's)")
    print("| unit | FP step | fake-quant reference | fake-quant fused | Lightning stage (fused) |")
    print("|---|---|---|---|---|")
    for label, grouping, index in ([] if args.skip_timing else UNITS):
        unit = find_units(sam, grouping)[index]
        block_io = prepare(sam, unit, grouping, args.boxes, args.seed)
        t = time_unit(sam, unit, block_io, args.steps, args.repeats)
        cells = [f"{t['fp'] * 1e3:.0f} ms"] + [f"{t[k] * 1e3:.0f} ms ({t[k] / t['fp']:.2f}x)"
                                               for k in ("reference", "fused", "lightning")]
        print(f"| {label} ({unit.name}) | " + " | ".join(cells) + " |")
    print()
    print(f"block I/O per unit, {CALIB_IMAGES} calibration images (MiB; fp32 / fp16 storage):")
    print("| unit | 7 boxes | 100 boxes |")
    print("|---|---|---|")
    for label, grouping, index in UNITS:
        unit = find_units(sam, grouping)[index]
        cells = [" / ".join(f"{block_io_bytes(unit, grouping, b, d) / 2**20:,.0f}" for d in (torch.float32,
                                                                                          torch.float16))
                 for b in (7, 100)]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    print_step_memory(sam, args.chunk, args.seed)


def step_peak_mib(sam: nn.Module, unit: ReconUnit, start: dict, boxes: int, seed: int) -> float:
    """Peak MiB of one reconstruction step of `unit` on a sample of `boxes` boxes (from the same start state)."""
    unit.module(sam).load_state_dict(start)
    args, kwargs = unit_inputs("attention_mlp", boxes, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        set_quant_mode(unit.module(sam), QuantMode.FP)
        targets = unit.run(unit.module(sam), args, kwargs)
        set_quant_mode(unit.module(sam), QuantMode.QUANTIZED)
    block_io = BlockIO(unit, [UnitSample(args, kwargs, targets)])
    settings = ReconSettings.from_config(ReconConfig(iters=1))
    return peak_allocated_bytes(lambda: reconstruct_unit_plain(sam, unit, block_io, settings)) / 2**20


def print_step_memory(sam: nn.Module, chunk: int, seed: int) -> None:
    """Peak memory of a decoder-attention step at 7, 50 and 100 boxes per image, chunked and not."""
    unit = find_units(sam, "attention_mlp")[1]
    if not any(isinstance(m, UniformQuantizer) and m.is_calibrated for m in unit.module(sam).modules()):
        prepare(sam, unit, "attention_mlp", 7, seed)
    start = copy.deepcopy(unit.module(sam).state_dict())
    print(f"peak memory of one decoder-attention step ({unit.name}), MiB (this machine's allocator, via the "
          f"profiler):")
    print(f"| boxes per image | max_boxes_per_step={chunk} | unbounded |")
    print("|---|---|---|")
    for boxes in (7, 50, 100):
        bounded = step_peak_mib(sam, unit, start, min(boxes, chunk), seed)  # the largest sample a chunked image gives
        unbounded = step_peak_mib(sam, unit, start, boxes, seed)
        print(f"| {boxes} | {bounded:,.0f} | {unbounded:,.0f} |")


if __name__ == "__main__":
    main()

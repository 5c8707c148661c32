"""Is a compiled fake quantizer worth it on this CPU? (issue 17) One QDrop fake-quant call, forward and backward,
on one activation of SAM-B's decoder shape (7 boxes x 4096 image tokens x 256 channels), side by side in one
process, one thread:

- `fused`: carsam's fused fake quantizer (`carsam.quant.fused.fused_fake_quantize`, eager);
- `compiled`: the reference composite (`fake_quantize` + QDrop mixing) compiled by `torch.compile` (inductor);
- `float product`: `x * s` forward and backward, the cheapest elementwise pass.

Every call (the float product's too) draws a QDrop mask (`rand_like` + compare), as a reconstruction step does,
so the three rows differ only in the quantizer.

    python bench/fake_quant_compile.py [--calls 5 --rounds 3]

Times are the mean per call of each round, this machine's CPU; the compile time is printed apart.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from carsam.quant.fused import fused_fake_quantize
from carsam.quant.primitives import fake_quantize

SHAPE = (7, 4096, 256)
QMIN, QMAX = -8, 7


def _reference(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep > 0, fake_quantize(x, scale, zero, QMIN, QMAX), x)


def _step(quantize: Callable[..., torch.Tensor], x0: torch.Tensor) -> None:
    x = x0.clone().requires_grad_(True)
    scale, zero = torch.tensor(0.3, requires_grad=True), torch.tensor(0.0)
    keep = (torch.rand_like(x0) < 0.5).float()
    quantize(x, scale, zero, keep).sum().backward()


def _fused(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return fused_fake_quantize(x, scale, zero, QMIN, QMAX, keep=keep)


def _product(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return x * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(_reference, dynamic=False)
    start = time.perf_counter()
    _step(compiled, x0)
    print(f"compile + first call: {time.perf_counter() - start:.1f} s")
    drivers = {"fused": _fused, "compiled": compiled, "float product": _product}
    for round_ in range(args.rounds):
        for name, quantize in drivers.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                _step(quantize, x0)
            print(f"round {round_}: {name:14s} {(time.perf_counter() - start) / args.calls * 1000:7.1f} ms per call")


if __name__ == "__main__":
    main()

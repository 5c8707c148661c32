"""Peak memory of a piece of work, measured the same way in benchmarks and tests.

On CUDA it is `torch.cuda.max_memory_allocated` above what was allocated before. On the CPU PyTorch keeps no
allocator statistics, so `peak_allocated_bytes` runs the work under `torch.profiler` with memory profiling and
replays every operator's allocations and frees in start order; the running total's maximum is the peak of the
tensors the work allocated (its inputs and the model's weights, allocated before, are not counted). It slows
the work down several times: use it on small steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_allocated_bytes(work: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """The peak bytes of tensor memory `work()` allocates on `device` (CPU: profiler replay; CUDA: allocator)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = sorted(((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()), key=lambda t: t[0])
    total = peak = 0
    for _, change in events:
        total += change
        peak = max(peak, total)
    return int(peak)


__all__ = ["peak_allocated_bytes"]

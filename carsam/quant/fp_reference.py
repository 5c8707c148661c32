"""The FP reference of Parameters that a method changes in place (MAC corrections, baked AdaRound weights).

A quantized model is run in FP mode (every quantizer `QuantMode.FP`) to get the FP model's outputs:
reconstruction targets, MAC's FP scores, interference and attention diagnostics. That is only the FP
model while the float weights are the original ones. Methods that change them in place first call
`remember_fp_(module, "weight")`: the original value is kept as a non-persistent buffer
`<name>_fp_reference` of the owning module (so it follows `.to(device)` and `copy.deepcopy`, and stays
out of `state_dict`). `fp_weights(model)` swaps the originals in for the duration of a block;
`carsam.recon.cache.quant_modes_set(model, QuantMode.FP)` does so, so every FP pass sees the FP model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

SUFFIX = "_fp_reference"


def remember_fp_(module: nn.Module, name: str) -> bool:
    """Keep the current value of `module.<name>` (a Parameter, or None) as its FP reference, unless one is
    kept already (the first value is the original). Returns whether a reference is kept now."""
    param = getattr(module, name)
    if param is None:
        return False
    if not hasattr(module, name + SUFFIX):
        module.register_buffer(name + SUFFIX, param.detach().clone(), persistent=False)
    return True


def fp_references(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every Parameter of `model` that has an FP reference."""
    return [(m, n) for m in model.modules() for n, _ in m.named_parameters(recurse=False) if hasattr(m, n + SUFFIX)]


@contextlib.contextmanager
def fp_weights(model: nn.Module) -> Iterator[None]:
    """Inside the block, every Parameter of `model` with an FP reference holds its original value (the same
    Parameter objects, their `.data` swapped); the current values are put back on exit."""
    swapped = []
    try:
        for module, name in fp_references(model):
            param = getattr(module, name)
            swapped.append((param, param.data))
            param.data = getattr(module, name + SUFFIX)
        yield
    finally:
        for param, data in swapped:
            param.data = data


__all__ = ["fp_references", "fp_weights", "remember_fp_"]

"""The FP reference of Parameters that a method changes in place (MAC corrections, baked AdaRound weights).

A quantized model is run in FP mode (every quantizer `QuantMode.FP`) to get the FP model's outputs:
reconstruction targets, MAC's FP scores, interference and attention diagnostics. That is only the FP
model while the float weights are the original ones. Methods that change them in place first call
`remember_fp_(module, "weight")`: the original value is kept as a non-persistent buffer
`<name>_fp_reference` of the owning module (so it follows `.to(device)` and `copy.deepcopy`, and stays
out of `state_dict`). `carsam.quant.state.fp_weights(model)` swaps the originals in for the duration of a block;
`carsam.quant.state.quant_modes_set(model, QuantMode.FP)` does so, so every FP pass sees the FP model.
"""

from __future__ import annotations

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


__all__ = ["fp_references", "remember_fp_"]

"""Checkpoints: load a state dict safely (`weights_only=True`) and into a model, with errors that say what to fix."""

from __future__ import annotations

from pathlib import Path

import torch
from segment_anything.modeling import Sam


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or belongs to another model."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint's state dict safely (`weights_only=True`), with errors that say what to fix.

    Accepts a bare state dict or a dict holding one under `"model"` (the testbed's format).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (set model.checkpoint to an existing .pth file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types on bad bytes (UnpicklingError, IndexError, ...)
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({err.__class__.__name__}); "
                              "re-download or re-save it") from err
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k: v.float() if v.is_floating_point() else v for k, v in obj.items()}


def apply_state_dict(sam: Sam, state: dict[str, torch.Tensor], model_type: str, path: str | Path) -> Sam:
    """Load `state` into `sam`, raising `CheckpointError` if it belongs to another architecture."""
    expected = sam.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        detail = (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} wrong-shape keys"
                  f" (e.g. {(missing + unexpected + wrong_shape)[0]})")
        raise CheckpointError(f"checkpoint {path} does not match model type '{model_type}': {detail}; "
                              "set model.type to the checkpoint's architecture")
    sam.load_state_dict(state)
    return sam.eval()

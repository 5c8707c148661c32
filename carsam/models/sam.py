"""Build the FP SAM to quantize: the real vit_b/l/h from a checkpoint, or the carsam testbed."""

from __future__ import annotations

from pathlib import Path

from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from carsam.models.checkpoint import CheckpointError, apply_state_dict, load_state_dict
from carsam.testbed.spec import TESTBED_CHECKPOINTS, build_testbed_from_checkpoint, build_testbed_sam

REAL_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")


def build_real_sam(model_type: str, checkpoint: str | Path) -> Sam:
    """Build SAM `vit_b`/`vit_l`/`vit_h` through `sam_model_registry` and load `checkpoint`."""
    if model_type not in REAL_MODEL_TYPES:
        raise ValueError(f"model.type must be one of {REAL_MODEL_TYPES} or 'testbed', got '{model_type}'")
    state = load_state_dict(checkpoint)  # fail on a bad file before building a large model
    sam = sam_model_registry[model_type](checkpoint=None)
    return apply_state_dict(sam, state, model_type, checkpoint)


def build_model(model_type: str, checkpoint: str | Path | None = None) -> Sam:
    """The FP SAM to quantize: a testbed (its shipped checkpoint unless `checkpoint`) or vit_b/l/h."""
    if model_type in TESTBED_CHECKPOINTS:
        return build_testbed_from_checkpoint(checkpoint or TESTBED_CHECKPOINTS[model_type])
    if not checkpoint:
        raise CheckpointError(f"model.checkpoint is required for model.type={model_type}")
    return build_real_sam(model_type, checkpoint)


def build_random_model(model_type: str) -> Sam:
    """The architecture of `model_type` (testbed or vit_b/l/h) with its own random initialisation (seed the
    global RNG first for a reproducible one): the reference of what training adds (`carsam stats`)."""
    if model_type in TESTBED_CHECKPOINTS:  # the testbeds share one architecture
        return build_testbed_sam()
    if model_type not in REAL_MODEL_TYPES:
        raise ValueError(f"model type must be one of {REAL_MODEL_TYPES} or 'testbed', got '{model_type}'")
    return sam_model_registry[model_type](checkpoint=None)

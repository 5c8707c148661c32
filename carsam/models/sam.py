"""Build the FP SAM to quantize: the real vit_b/l/h or SAM2 (sam2_t/s/b+/l) from a checkpoint, or a carsam testbed.

SAM2 models are built by `carsam.models.sam2_build`, imported only then (importing `sam2` initialises Hydra).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeAlias

from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from carsam.models.checkpoint import CheckpointError, apply_state_dict, load_state_dict
from carsam.models.sam2_image import SAM2_MODEL_TYPES, Sam2ImageModel
from carsam.testbed.shipped import SHIPPED_TESTBEDS, build_random_testbed, build_shipped_testbed

SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
REAL_MODEL_TYPES = (*SAM_MODEL_TYPES, *SAM2_MODEL_TYPES)  # built from a checkpoint the user names
SamModel: TypeAlias = "Sam | Sam2ImageModel"  # what build_model returns: segment_anything's Sam or carsam's SAM2


def build_real_sam(model_type: str, checkpoint: str | Path) -> Sam:
    """Build SAM `vit_b`/`vit_l`/`vit_h` through `sam_model_registry` and load `checkpoint`."""
    if model_type not in SAM_MODEL_TYPES:
        raise ValueError(f"model.type must be one of {SAM_MODEL_TYPES} or 'testbed', got '{model_type}'")
    state = load_state_dict(checkpoint)  # fail on a bad file before building a large model
    sam = sam_model_registry[model_type](checkpoint=None)
    return apply_state_dict(sam, state, model_type, checkpoint)


def build_model(model_type: str, checkpoint: str | Path | None = None, sam2_stability_fallback: bool | None = None
                ) -> SamModel:
    """The FP SAM to quantize: a testbed (its shipped checkpoint unless `checkpoint`), vit_b/l/h or SAM2
    (`sam2_stability_fallback`: `Sam2ImageModel.stability_fallback`, SAM2's single-mask fallback; None keeps the
    model's own default)."""
    model: SamModel
    if model_type in SHIPPED_TESTBEDS:
        model = build_shipped_testbed(model_type, checkpoint)
    elif not checkpoint:
        raise CheckpointError(f"model.checkpoint is required for model.type={model_type}")
    elif model_type in SAM2_MODEL_TYPES:
        from carsam.models.sam2_build import build_real_sam2
        model = build_real_sam2(model_type, checkpoint)
    else:
        return build_real_sam(model_type, checkpoint)
    if isinstance(model, Sam2ImageModel) and sam2_stability_fallback is not None:
        model.stability_fallback = sam2_stability_fallback
    return model


def build_random_model(model_type: str) -> SamModel:
    """The architecture of `model_type` (testbed, vit_b/l/h or SAM2) with its own random initialisation (seed the
    global RNG first for a reproducible one): the reference of what training adds (`carsam stats`)."""
    if model_type in SHIPPED_TESTBEDS:
        return build_random_testbed(model_type)
    if model_type in SAM2_MODEL_TYPES:
        from carsam.models.sam2_build import build_random_sam2
        return build_random_sam2(model_type)
    if model_type not in REAL_MODEL_TYPES:
        raise ValueError(f"model type must be one of {(*SHIPPED_TESTBEDS, *REAL_MODEL_TYPES)}, got '{model_type}'")
    return sam_model_registry[model_type](checkpoint=None)

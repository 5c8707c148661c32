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
from carsam.testbed.sam2_spec import SAM2_TESTBED_TYPE, build_sam2_testbed, build_sam2_testbed_from_checkpoint
from carsam.testbed.spec import TESTBED_CHECKPOINTS, build_testbed_from_checkpoint, build_testbed_sam

SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
# model types built from a checkpoint the user names; the SAM2 testbed is one until its checkpoint ships
REAL_MODEL_TYPES = (*SAM_MODEL_TYPES, *SAM2_MODEL_TYPES, SAM2_TESTBED_TYPE)
SamModel: TypeAlias = "Sam | Sam2ImageModel"  # what build_model returns: segment_anything's Sam or carsam's SAM2


def build_real_sam(model_type: str, checkpoint: str | Path) -> Sam:
    """Build SAM `vit_b`/`vit_l`/`vit_h` through `sam_model_registry` and load `checkpoint`."""
    if model_type not in SAM_MODEL_TYPES:
        raise ValueError(f"model.type must be one of {SAM_MODEL_TYPES} or 'testbed', got '{model_type}'")
    state = load_state_dict(checkpoint)  # fail on a bad file before building a large model
    sam = sam_model_registry[model_type](checkpoint=None)
    return apply_state_dict(sam, state, model_type, checkpoint)


def build_model(model_type: str, checkpoint: str | Path | None = None, sam2_stability_fallback: bool = True
                ) -> SamModel:
    """The FP SAM to quantize: a testbed (its shipped checkpoint unless `checkpoint`), vit_b/l/h or SAM2
    (`sam2_stability_fallback`: `Sam2ImageModel.stability_fallback`, SAM2's single-mask fallback)."""
    if model_type in TESTBED_CHECKPOINTS:
        return build_testbed_from_checkpoint(checkpoint or TESTBED_CHECKPOINTS[model_type])
    if not checkpoint:
        raise CheckpointError(f"model.checkpoint is required for model.type={model_type}")
    if model_type in SAM2_MODEL_TYPES or model_type == SAM2_TESTBED_TYPE:
        sam2 = _build_sam2(model_type, checkpoint)
        sam2.stability_fallback = sam2_stability_fallback
        return sam2
    return build_real_sam(model_type, checkpoint)


def _build_sam2(model_type: str, checkpoint: str | Path) -> Sam2ImageModel:
    """SAM2 `sam2_t`..`sam2_l` from an official checkpoint, or the SAM2 testbed from its own state dict."""
    if model_type == SAM2_TESTBED_TYPE:
        return build_sam2_testbed_from_checkpoint(checkpoint)
    from carsam.models.sam2_build import build_real_sam2
    return build_real_sam2(model_type, checkpoint)


def build_random_model(model_type: str) -> SamModel:
    """The architecture of `model_type` (testbed, vit_b/l/h or SAM2) with its own random initialisation (seed the
    global RNG first for a reproducible one): the reference of what training adds (`carsam stats`)."""
    if model_type in TESTBED_CHECKPOINTS:  # the testbeds share one architecture
        return build_testbed_sam()
    if model_type == SAM2_TESTBED_TYPE:
        return build_sam2_testbed()
    if model_type in SAM2_MODEL_TYPES:
        from carsam.models.sam2_build import build_random_sam2
        return build_random_sam2(model_type)
    if model_type not in REAL_MODEL_TYPES:
        raise ValueError(f"model type must be one of {REAL_MODEL_TYPES} or 'testbed', got '{model_type}'")
    return sam_model_registry[model_type](checkpoint=None)

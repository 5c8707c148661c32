"""Build SAM2 image models through the `sam2` package (imported here, so only when a SAM2 model is built).

`build_sam2(config, None)` instantiates the architecture from the package's Hydra config (`SAM2_CONFIGS`);
the checkpoint is loaded by carsam (`weights_only`, the same errors as SAM v1) into the whole `SAM2Base`
before its image path is regrouped into a `Sam2ImageModel` (`carsam.models.sam2_image`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base

from carsam.models.checkpoint import apply_state_dict, load_state_dict
from carsam.models.sam2_image import SAM2_CONFIGS, Sam2ImageEncoder, Sam2ImageModel


def build_sam2_base(model_type: str) -> SAM2Base:
    """The randomly initialised `SAM2Base` of `model_type` (seed the global RNG first for a reproducible one),
    with SAM2's image-predictor post-processing settings (the single-mask stability fallback on)."""
    if model_type not in SAM2_CONFIGS:
        raise ValueError(f"SAM2 model type must be one of {tuple(SAM2_CONFIGS)}, got '{model_type}'")
    return build_sam2_architecture(SAM2_CONFIGS[model_type])


def build_sam2_architecture(config: str, overrides: Sequence[str] = ()) -> SAM2Base:
    """`build_sam2(config)` with Hydra `overrides` (e.g. the SAM2 testbed's), randomly initialised, in eval mode."""
    base: SAM2Base = build_sam2(config, None, device="cpu", mode="eval", hydra_overrides_extra=list(overrides),
                                apply_postprocessing=True)
    return base


def image_model(base: SAM2Base, model_type: str) -> Sam2ImageModel:
    """Regroup `base`'s image path into a `Sam2ImageModel` (sharing its modules; see carsam.models.sam2_image)."""
    if not (base.use_high_res_features_in_sam and base.directly_add_no_mem_embed and base.num_feature_levels == 3):
        raise ValueError("carsam's SAM2 image path expects the SAM 2.1 image settings (high-resolution features, "
                         "no_mem_embed added directly, 3 feature levels)")
    decoder = base.sam_mask_decoder
    conv_s0, conv_s1 = decoder.conv_s0, decoder.conv_s1
    del decoder.conv_s0, decoder.conv_s1  # they run in the image pass: the encoder owns them
    encoder = Sam2ImageEncoder(base.image_encoder.trunk, base.image_encoder.neck, conv_s0, conv_s1,
                               base.no_mem_embed, int(base.image_size), int(base.image_encoder.scalp))
    return Sam2ImageModel(encoder, base.sam_prompt_encoder, decoder, model_type).eval()


def build_real_sam2(model_type: str, checkpoint: str | Path) -> Sam2ImageModel:
    """SAM2 `model_type` with the official checkpoint (`{"model": state_dict}`) loaded, as a `Sam2ImageModel`."""
    state = load_state_dict(checkpoint)  # fail on a bad file before building the model
    base = build_sam2_base(model_type)
    apply_state_dict(base, state, model_type, checkpoint)
    return image_model(base, model_type)


def build_random_sam2(model_type: str) -> Sam2ImageModel:
    """SAM2 `model_type` with its random initialisation (seed the global RNG first)."""
    return image_model(build_sam2_base(model_type), model_type)


"""Build SAM models: the real vit_b/l/h from a checkpoint, and the carsam testbed.

The testbed is a small SAM made of `segment_anything.modeling` classes. Its mask decoder has
SAM's real shape (transformer dim 256, depth 2, 8 heads, MLP 2048, attention downsample 2),
since that is where CAR-SAM acts; its image encoder is a small ViT (windowed + global blocks,
decomposed relative positions) whose neck outputs 256 channels.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

REAL_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or belongs to another model."""


@dataclasses.dataclass(frozen=True)
class TestbedSpec:
    """Architecture of the testbed SAM (the decoder fields default to real SAM's)."""

    __test__ = False  # not a pytest test class

    img_size: int = 128
    patch_size: int = 8
    encoder_embed_dim: int = 128
    encoder_depth: int = 4
    encoder_num_heads: int = 4
    encoder_window_size: int = 8
    encoder_global_attn_indexes: tuple[int, ...] = (1, 3)
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8

    @property
    def embedding_grid(self) -> int:
        """Side of the image-embedding grid (img_size / patch_size)."""
        return self.img_size // self.patch_size


def build_testbed_sam(spec: TestbedSpec = TestbedSpec()) -> Sam:
    """A randomly initialised testbed SAM in eval mode."""
    grid = spec.embedding_grid
    encoder = ImageEncoderViT(
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        embed_dim=spec.encoder_embed_dim,
        depth=spec.encoder_depth,
        num_heads=spec.encoder_num_heads,
        mlp_ratio=4.0,
        out_chans=spec.prompt_embed_dim,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=spec.encoder_window_size,
        global_attn_indexes=spec.encoder_global_attn_indexes,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=spec.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(spec.img_size, spec.img_size),
        mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=spec.decoder_depth,
            embedding_dim=spec.prompt_embed_dim,
            mlp_dim=spec.decoder_mlp_dim,
            num_heads=spec.decoder_num_heads,
        ),
        transformer_dim=spec.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    sam = Sam(encoder, prompt_encoder, decoder, pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD))
    return sam.eval()


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


def build_real_sam(model_type: str, checkpoint: str | Path) -> Sam:
    """Build SAM `vit_b`/`vit_l`/`vit_h` through `sam_model_registry` and load `checkpoint`."""
    if model_type not in REAL_MODEL_TYPES:
        raise ValueError(f"model.type must be one of {REAL_MODEL_TYPES} or 'testbed', got '{model_type}'")
    state = load_state_dict(checkpoint)  # fail on a bad file before building a large model
    sam = sam_model_registry[model_type](checkpoint=None)
    return apply_state_dict(sam, state, model_type, checkpoint)


def build_testbed_from_checkpoint(checkpoint: str | Path, spec: TestbedSpec = TestbedSpec()) -> Sam:
    """Build the testbed SAM and load its (fp16-stored) checkpoint, upcast to fp32."""
    state = load_state_dict(checkpoint)
    return apply_state_dict(build_testbed_sam(spec), state, "testbed", checkpoint)


ASSETS = Path(__file__).resolve().parent.parent / "assets"
TESTBED_CHECKPOINT = ASSETS / "testbed_sam.pth"
TESTBED_CARD = ASSETS / "testbed.json"


def build_model(model_type: str, checkpoint: str | Path | None = None) -> Sam:
    """The FP SAM to quantize: the testbed (shipped checkpoint unless `checkpoint`) or vit_b/l/h."""
    if model_type == "testbed":
        return build_testbed_from_checkpoint(checkpoint or TESTBED_CHECKPOINT)
    if not checkpoint:
        raise CheckpointError(f"model.checkpoint is required for model.type={model_type}")
    return build_real_sam(model_type, checkpoint)

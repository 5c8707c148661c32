"""The testbed SAM's architecture (the shipped checkpoints and cards: `carsam.testbed.shipped`).

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
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from carsam.models.checkpoint import apply_state_dict, load_state_dict

PIXEL_MEAN = (123.675, 116.28, 103.53)  # SAM's input normalisation
PIXEL_STD = (58.395, 57.12, 57.375)


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


def build_testbed_from_checkpoint(checkpoint: str | Path, spec: TestbedSpec = TestbedSpec()) -> Sam:
    """Build the testbed SAM and load its (fp16-stored) checkpoint, upcast to fp32."""
    state = load_state_dict(checkpoint)
    return apply_state_dict(build_testbed_sam(spec), state, "testbed", checkpoint)

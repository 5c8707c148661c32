"""SAM2's image path as one module laid out like SAM v1: `image_encoder`, `prompt_encoder`, `mask_decoder`.

`sam2.modeling.sam2_base.SAM2Base` is a video model: its image path (what `SAM2ImagePredictor` runs) is spread
over `image_encoder` (Hiera trunk + FPN neck), two 1x1 convs that belong to the mask decoder (`conv_s0`,
`conv_s1`) but run once per image, and the `no_mem_embed` Parameter added to the lowest-resolution features.
`Sam2ImageModel` regroups exactly those modules (the same objects, so the weights are the checkpoint's), and
drops the video modules (memory attention and encoder, object-pointer projections):

- `image_encoder` (`Sam2ImageEncoder`): trunk, neck, `conv_s0`, `conv_s1`, `no_mem_embed`. Everything the image
  pass computes lives under it, so the FP-embedding cache, encoder hooks and the encoder stage key see all of
  it, and the decoder's block-wise calibration never meets the high-resolution convs (issue 18's trap).
- `prompt_encoder`: SAM2's `PromptEncoder`; `mask_decoder`: SAM2's `MaskDecoder` without `conv_s0`/`conv_s1`
  (its `predict_masks` never calls them). `mask_decoder.transformer` is SAM2's two-way transformer, with SAM
  v1's layer and attention names.

This module imports nothing from `sam2` (importing `sam2` initialises Hydra's global state); the builders
that do live in `carsam.models.sam2_build`, imported when a SAM2 model is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

SAM2_CONFIGS = {  # model.type -> the sam2 package's Hydra config (SAM 2.1 checkpoints)
    "sam2_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
SAM2_MODEL_TYPES = tuple(SAM2_CONFIGS)
SAM2_STABILITY_FALLBACK = True  # the sam2.1 configs' `dynamic_multimask_via_stability`, as `build_sam2` sets it
BOX_CORNER_LABELS = (2, 3)  # SAM2's point labels of a box's top-left and bottom-right corners


class Sam2ImageEncoder(nn.Module):
    """SAM2's image pass: `pixels` `(1, 3, S, S)` (normalised) -> the decoder's three inputs.

    Returns `(image_embed, feat_s0, feat_s1)`: `(1, C, S/16, S/16)` with `no_mem_embed` added (C = 256),
    `(1, C/8, S/4, S/4)` and `(1, C/4, S/8, S/8)`, the high-resolution features after `conv_s0`/`conv_s1`.
    The arithmetic is `SAM2Base.forward_image` + `_prepare_backbone_features` + `SAM2ImagePredictor.set_image`
    op for op (the flatten/permute there only reshapes), so the outputs are bit-identical.
    """

    trunk: Any  # sam2's Hiera and FpnNeck (untyped package)
    neck: Any

    def __init__(self, trunk: nn.Module, neck: nn.Module, conv_s0: nn.Conv2d, conv_s1: nn.Conv2d,
                 no_mem_embed: nn.Parameter, img_size: int, scalp: int = 1) -> None:
        super().__init__()
        self.trunk, self.neck, self.conv_s0, self.conv_s1 = trunk, neck, conv_s0, conv_s1
        self.no_mem_embed = no_mem_embed  # (1, 1, C)
        self.img_size, self.scalp = img_size, scalp

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features, _ = self.neck(self.trunk(pixels))
        if self.scalp > 0:
            features = features[: -self.scalp]
        feat_s0, feat_s1 = self.conv_s0(features[0]), self.conv_s1(features[1])
        image_embed = features[-1] + self.no_mem_embed.view(1, -1, 1, 1)
        return image_embed, feat_s0, feat_s1


class Sam2ImageModel(nn.Module):
    """SAM2 for box-prompted image segmentation (module docstring). `image_size`: the square input side S."""

    mask_threshold = 0.0
    image_encoder: Sam2ImageEncoder
    prompt_encoder: Any  # sam2's PromptEncoder and MaskDecoder (untyped package)
    mask_decoder: Any

    def __init__(self, image_encoder: Sam2ImageEncoder, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 model_type: str) -> None:
        super().__init__()
        self.image_encoder, self.prompt_encoder, self.mask_decoder = image_encoder, prompt_encoder, mask_decoder
        self.model_type = model_type

    @property
    def image_size(self) -> int:
        return int(self.image_encoder.img_size)

    @property
    def device(self) -> torch.device:
        return self.image_encoder.no_mem_embed.device

    @property
    def stability_fallback(self) -> bool:
        """`dynamic_multimask_via_stability`: in eval mode a single-mask request returns the best multimask
        output instead when the single mask's stability score is below 0.98 (SAM2's default, on)."""
        return bool(self.mask_decoder.dynamic_multimask_via_stability)

    @stability_fallback.setter
    def stability_fallback(self, on: bool) -> None:
        self.mask_decoder.dynamic_multimask_via_stability = bool(on)

    def decode_boxes(self, image_embed: Tensor, high_res: Sequence[Tensor], corners: Tensor) -> tuple[Tensor, Tensor]:
        """SAM2's single-mask decode of box prompts, as `SAM2ImagePredictor._predict` calls it.

        image_embed `(1, C, g, g)`, high_res the two high-resolution features, corners `(k, 2, 2)` (each box's
        top-left and bottom-right in the S x S input frame) -> low-resolution logits `(k, 1, 4g, 4g)` and IoU
        predictions `(k, 1)`. A box is two points labelled `BOX_CORNER_LABELS` (the prompt encoder appends a padding
        point); the image embedding is repeated per box. The stability fallback applies in eval mode only.
        """
        labels = torch.tensor([BOX_CORNER_LABELS], dtype=torch.int, device=corners.device).repeat(len(corners), 1)
        sparse, dense = self.prompt_encoder(points=(corners, labels), boxes=None, masks=None)
        low_res, iou, _, _ = self.mask_decoder(
            image_embeddings=image_embed, image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            repeat_image=len(corners) > 1, high_res_features=list(high_res))
        return low_res, iou

    def encoder_fields(self) -> dict[str, Any]:
        """The image pass's architecture and preprocessing as built (what a checkpoint hash alone does not pin)."""
        trunk = self.image_encoder.trunk
        blocks = [[int(b.attn.num_heads), int(b.window_size), bool(b.q_stride)] for b in trunk.blocks]
        param = next(self.image_encoder.parameters())
        return {"family": "sam2", "img_size": self.image_size, "blocks": blocks,
                "patch": list(trunk.patch_embed.proj.kernel_size), "scalp": int(self.image_encoder.scalp),
                "dtype": str(param.dtype)}


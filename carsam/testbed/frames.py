"""How a testbed sees its training images and prompts: SAM v1's frame or SAM2's.

The training recipe (`carsam.testbed.train`) is the same for both families; what differs is how an image enters
the model and how a box reaches the decoder, and each frame does it the way its family's predictor does at
evaluation (`carsam.eval.inference`, `carsam.eval.sam2_inference`):

- `SamFrame` (SAM v1): the longest side resized to S and the image padded at the bottom and right
  (`Sam.preprocess`, SAM's pixel mean and std); boxes through the prompt encoder's box path.
- `Sam2Frame` (SAM2): the image resized to the square S x S (ImageNet's mean and std); boxes as two corner
  points with labels 2 and 3; the decoder also receives the high-resolution features. In training mode SAM2's
  stability fallback is off by construction, so the loss sees mask token 0, the single-mask output.

Shapes: images `(B, 3, S, S)` float (normalised, in the input frame); boxes `(k, 4)` xyxy in that frame;
logits `(k, S, S)`; IoU predictions `(k,)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor, nn

from carsam.models.sam2_image import Sam2ImageModel


class SamFrame:
    """SAM v1's frame (module docstring)."""

    def __init__(self, sam: Any) -> None:
        self.sam, self.size = sam, int(sam.image_encoder.img_size)
        self._resize = ResizeLongestSide(self.size)

    def resize(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h, w, 3) uint8, the longest side S."""
        return self._resize.apply_image(pixels)

    def to_input(self, image: Tensor) -> Tensor:
        """(3, h, w) float pixels in [0, 255] -> (3, S, S) normalised and padded."""
        return self.sam.preprocess(image[None])[0]

    def to_target(self, masks: Tensor) -> Tensor:
        """(k, h, w) float masks -> (k, S, S), padded as the image."""
        return F.pad(masks, (0, self.size - masks.shape[-1], 0, self.size - masks.shape[-2]))

    def encode(self, images: Tensor) -> list[tuple[Tensor, ...]]:
        """(B, 3, S, S) -> per image, the decoder's image inputs: `((1, C, g, g),)`."""
        embeddings = self.sam.image_encoder(images)
        return [(embeddings[i : i + 1],) for i in range(len(images))]

    def decode(self, features: tuple[Tensor, ...], boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Single-mask logits (k, S, S) in the input frame and IoU predictions (k,)."""
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        low_res, iou = self.sam.mask_decoder(image_embeddings=features[0],
                                             image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=False)
        logits = F.interpolate(low_res, (self.size, self.size), mode="bilinear", align_corners=False)
        return logits[:, 0], iou[:, 0]


class Sam2Frame(SamFrame):
    """SAM2's frame (module docstring)."""

    def __init__(self, sam: Sam2ImageModel) -> None:
        from sam2.utils.transforms import SAM2Transforms  # loaded already: a Sam2ImageModel exists

        self.sam, self.size = sam, sam.image_size
        transforms = SAM2Transforms(resolution=self.size, mask_threshold=sam.mask_threshold)  # its mean and std
        self._mean = torch.tensor(transforms.mean).view(3, 1, 1) * 255.0  # on pixels in [0, 255]
        self._std = torch.tensor(transforms.std).view(3, 1, 1) * 255.0

    def resize(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (S, S, 3) uint8 (bilinear with antialiasing, as SAM2Transforms' Resize)."""
        image = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy
        resized = F.interpolate(image[None].float(), (self.size, self.size), mode="bilinear", antialias=True,
                                align_corners=False)[0]
        return resized.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()

    def to_input(self, image: Tensor) -> Tensor:
        """(3, S, S) float pixels in [0, 255] -> normalised with ImageNet's mean and std."""
        return (image - self._mean) / self._std

    def to_target(self, masks: Tensor) -> Tensor:
        return masks  # already S x S

    def encode(self, images: Tensor) -> list[tuple[Tensor, ...]]:
        """(B, 3, S, S) -> per image `(image_embed (1, C, g, g), feat_s0, feat_s1)`."""
        image_embed, feat_s0, feat_s1 = self.sam.image_encoder(images)
        return [(image_embed[i : i + 1], feat_s0[i : i + 1], feat_s1[i : i + 1]) for i in range(len(images))]

    def decode(self, features: tuple[Tensor, ...], boxes: Tensor) -> tuple[Tensor, Tensor]:
        low_res, iou = self.sam.decode_boxes(features[0], features[1:], boxes.reshape(-1, 2, 2))
        logits = F.interpolate(low_res, (self.size, self.size), mode="bilinear", align_corners=False)
        return logits[:, 0], iou[:, 0]


def frame_for(sam: nn.Module) -> SamFrame:
    """The training frame of `sam`'s family."""
    return Sam2Frame(sam) if isinstance(sam, Sam2ImageModel) else SamFrame(sam)

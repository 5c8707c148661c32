"""Box-prompted SAM2 inference with `SAM2ImagePredictor`'s semantics, on a `Sam2ImageModel`.

What the image predictor does for `predict(box=boxes, multimask_output=False)`, kept as values rather than
predictor state (`carsam.eval.inference.SamBoxPredictor`'s interface, so every carsam pass runs SAM2 unchanged):
- the image is resized to the square S x S (no aspect-preserving pad, unlike SAM v1) and normalised with
  ImageNet's mean and std, by the package's own `SAM2Transforms`;
- each box becomes its two corners, labels 2 and 3, scaled by S / W and S / H in float32, and goes through the
  prompt encoder's point path (which appends one padding point);
- the decoder sees the image embedding repeated per box and the two high-resolution features; with the
  stability fallback on (`Sam2ImageModel.stability_fallback`, `model.sam2_stability_fallback`), an unstable
  single mask is swapped for the best of the three multimask outputs, in eval mode only;
- the low-resolution logits are upsampled to the original size, then thresholded at 0. Hole filling and
  sprinkle removal (which need the CUDA extension) stay off, as the predictor's defaults.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from sam2.utils.transforms import SAM2Transforms

from carsam.eval.inference import EmbeddingSource, ImageEmbedding, SamBoxPredictor
from carsam.models.finite import check_finite_output
from carsam.models.sam2_image import Sam2ImageModel


class Sam2BoxPredictor(SamBoxPredictor):
    """Predict one mask and one IoU score per box prompt with a (possibly quantized) `Sam2ImageModel`."""

    def __init__(self, sam: Sam2ImageModel, max_boxes_per_batch: int = 64, source: EmbeddingSource | None = None):
        super().__init__(sam, max_boxes_per_batch, source)
        self.transforms = SAM2Transforms(resolution=sam.image_size, mask_threshold=sam.mask_threshold)

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """Encode an (H, W, 3) uint8 RGB image: `features` (1, 256, S/16, S/16) and `high_res` (module docstring)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        if not image.flags.writeable:  # ToTensor warns on a read-only array (e.g. one read by PIL)
            image = image.copy()
        pixels = self.transforms(image)[None].to(self.device)
        image_embed, feat_s0, feat_s1 = self.sam.image_encoder(pixels)
        for name, tensor in (("image embedding", image_embed), ("high-resolution features", feat_s0),
                             ("high-resolution features", feat_s1)):
            check_finite_output(tensor, f"the image encoder's {name}")
        side = self.sam.image_size
        return ImageEmbedding(image_embed, (side, side), (image.shape[0], image.shape[1]), (feat_s0, feat_s1))

    def input_frame(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The S x S input frame of `image` (H, W, 3) uint8 as a picture (the square resize, no padding; bilinear,
        for display), and `boxes` (N, 4) xyxy original pixels -> (N, 4) float64 in its pixels."""
        side = self.sam.image_size
        frame = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR))
        corners = self.input_frame_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), image.shape[:2])
        return frame, corners.reshape(-1, 4).cpu().numpy().astype(np.float64)

    def input_frame_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> torch.Tensor:
        """Boxes (N, 4) xyxy in original pixels -> their corners (N, 2, 2) in the S x S input frame (float32)."""
        corners = torch.as_tensor(boxes, dtype=torch.float, device=self.device).reshape(-1, 2, 2)
        return self.transforms.transform_boxes(corners, normalize=True, orig_hw=original_size)

    def _decode(self, features: torch.Tensor, embedding: ImageEmbedding,
                boxes: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Decode (B, 2, 2) box corners in the input frame: masks (B, H, W) bool, IoUs (B,) float32."""
        high_res = [f.to(device=self.device, dtype=features.dtype) for f in embedding.high_res]
        low_res, iou = self.sam.decode_boxes(features, high_res, boxes)
        check_finite_output(low_res, "the mask decoder's mask logits")
        check_finite_output(iou, "the mask decoder's IoU predictions")
        masks = self.transforms.postprocess_masks(low_res, embedding.original_size) > self.sam.mask_threshold
        return masks[:, 0].cpu().numpy(), iou[:, 0].float().cpu().numpy()

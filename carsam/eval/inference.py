"""Box-prompted SAM inference: one encoder pass per image, then batched box decoding.

`box_predictor(model)` gives the predictor of the model's family: `SamBoxPredictor` for SAM v1 and the
testbeds, `carsam.eval.sam2_inference.Sam2BoxPredictor` (SAM2ImagePredictor's semantics) for SAM2.

`SamBoxPredictor` mirrors the math of `segment_anything.SamPredictor` for the protocol's case (box prompts,
`multimask_output=False`, mask = upsampled logits > `sam.mask_threshold`) but keeps the image
embedding as a value (`ImageEmbedding`) rather than predictor state, so that callers can store or reuse it.

Every encoder pass over a dataset image goes through `SamBoxPredictor.embed_image(dataset, image_id)`.
A predictor built with a `source` (the run's `carsam.cache.embeddings.EmbeddingStore`, handed down from
the pipeline's `RunContext`) asks it for the embedding, which may serve the FP encoder's output from
disk; without one it reads the image and encodes it. `protocol_pass` runs a dataset through a predictor
the way the protocol does (per image: embed, then decode all of its prompt boxes): calibration, FP
statistics passes and block-I/O capture all use it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn
from tqdm import tqdm

from carsam.models.finite import check_finite_output
from carsam.models.sam2_image import Sam2ImageModel

if TYPE_CHECKING:
    from carsam.data.coco import CocoBoxPrompts

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ImageEmbedding:
    """The encoder output of one image and the sizes needed to map masks back to it.

    features: (1, C, g, g) tensor (C = 256, g = img_size / patch_size). input_size: (h, w) of the
    resized image before padding (long side = the encoder's img_size; SAM2: the square input, (S, S)).
    original_size: (H, W). high_res: SAM2's high-resolution features `(1, C/8, 4g, 4g)` and `(1, C/4, 2g, 2g)`
    (empty for SAM v1). `embed` runs under `torch.no_grad()`: the features carry no autograd graph.
    """

    features: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    high_res: tuple[torch.Tensor, ...] = ()

    def to(self, device: torch.device | str) -> ImageEmbedding:
        """The same embedding with its tensors on `device`."""
        return dataclasses.replace(self, features=self.features.to(device),
                                   high_res=tuple(t.to(device) for t in self.high_res))


class EmbeddingSource(Protocol):
    """Serves the embedding of one dataset image for `predictor` (e.g. the on-disk `EmbeddingStore`; see the
    module docstring)."""

    def embed(self, predictor: SamBoxPredictor, dataset: CocoBoxPrompts, image_id: int) -> ImageEmbedding: ...


class SamBoxPredictor:
    """Predict one mask and one IoU score per box prompt with a (possibly quantized) SAM."""

    def __init__(self, sam: Sam, max_boxes_per_batch: int = 64, source: EmbeddingSource | None = None) -> None:
        if max_boxes_per_batch < 1:
            raise ValueError(f"max_boxes_per_batch must be >= 1, got {max_boxes_per_batch}")
        self.sam = sam
        self.source = source
        self.max_boxes_per_batch = max_boxes_per_batch
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)

    @property
    def device(self) -> torch.device:
        return self.sam.device

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """Encode an (H, W, 3) uint8 RGB image: resize the long side, normalise, pad, run the encoder."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        resized = self.transform.apply_image(image)  # (h, w, 3) uint8
        pixels = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        features = self.sam.image_encoder(self.sam.preprocess(pixels.float()))
        check_finite_output(features, "the image encoder's outputs")
        return ImageEmbedding(features, (resized.shape[0], resized.shape[1]), (image.shape[0], image.shape[1]))

    def embed_image(self, dataset: CocoBoxPrompts, image_id: int) -> ImageEmbedding:
        """`embed` of the dataset's image `image_id`, through the predictor's `source` if it has one."""
        if self.source is None:
            return self.embed(dataset.load_image(image_id))
        return self.source.embed(self, dataset, image_id)

    @torch.no_grad()
    def predict(self, embedding: ImageEmbedding, boxes_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks (N, H, W) bool and predicted IoUs (N,) float32 for N boxes (N, 4) xyxy in original pixels.

        Boxes are decoded in chunks of `max_boxes_per_batch`; N = 0 gives (0, H, W) and (0,).
        """
        boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        height, width = embedding.original_size
        if len(boxes) == 0:
            return np.zeros((0, height, width), dtype=bool), np.zeros((0,), dtype=np.float32)
        boxes_t = self.input_frame_boxes(boxes, embedding.original_size)
        dtype = next(self.sam.mask_decoder.parameters()).dtype
        features = embedding.features.to(device=self.device, dtype=dtype)
        chunks = [self._decode(features, embedding, part) for part in boxes_t.split(self.max_boxes_per_batch)]
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])

    def input_frame(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The encoder's input frame of `image` (H, W, 3) uint8, as a picture: (S, S, 3) uint8 (SAM's: the long
        side resized to S, zero-padded at the bottom and right), and `boxes` (N, 4) xyxy original pixels ->
        (N, 4) float64 in its pixels. The image embedding's grid covers this frame."""
        side = self.sam.image_encoder.img_size
        resized = self.transform.apply_image(image)
        frame = np.zeros((side, side, 3), dtype=np.uint8)
        frame[:resized.shape[0], :resized.shape[1]] = resized
        return frame, self.transform.apply_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), image.shape[:2])

    def input_frame_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> torch.Tensor:
        """Boxes (N, 4) xyxy in original pixels -> (N, 4) float32 in the encoder's input frame, on the device."""
        scaled = self.transform.apply_boxes(boxes, original_size)
        return torch.as_tensor(scaled, dtype=torch.float32, device=self.device)

    def _decode(self, features: torch.Tensor, embedding: ImageEmbedding,
                boxes: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Decode (B, 4) boxes already in the resized frame: masks (B, H, W) bool, IoUs (B,) float32."""
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=features,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        check_finite_output(low_res, "the mask decoder's mask logits")
        check_finite_output(iou, "the mask decoder's IoU predictions")
        logits = self.sam.postprocess_masks(low_res, embedding.input_size, embedding.original_size)
        masks = logits[:, 0] > self.sam.mask_threshold
        return masks.cpu().numpy(), iou[:, 0].float().cpu().numpy()


def box_predictor(sam: nn.Module, max_boxes_per_batch: int = 64,
                  source: EmbeddingSource | None = None) -> SamBoxPredictor:
    """The box predictor of `sam`'s family: `Sam2BoxPredictor` for a `Sam2ImageModel`, else `SamBoxPredictor`."""
    if isinstance(sam, Sam2ImageModel):
        from carsam.eval.sam2_inference import Sam2BoxPredictor
        return Sam2BoxPredictor(sam, max_boxes_per_batch, source)
    return SamBoxPredictor(sam, max_boxes_per_batch, source)


def run_image(predictor: SamBoxPredictor, dataset: CocoBoxPrompts, image_id: int, encoder_only: bool = False) -> None:
    """Run one image as the protocol does: embed it, then decode all of its prompt boxes (`encoder_only`: stop
    after the encoder). An image without a prompt box is skipped (no encoder pass either)."""
    boxes = dataset.prompts(image_id)[0]
    if len(boxes) == 0:
        return
    embedding = predictor.embed_image(dataset, image_id)
    if not encoder_only:
        predictor.predict(embedding, boxes)


def protocol_pass(predictor: SamBoxPredictor, dataset: CocoBoxPrompts, *, encoder_only: bool = False,
                  after_image: Callable[[int], None] | None = None, progress: bool = False,
                  desc: str = "pass") -> None:
    """`run_image` on every image of `dataset` in order, calling `after_image(image_id)` after each one
    (e.g. to collect what hooks recorded). The caller sets the quantizer modes, eval mode and no_grad."""
    for image_id in tqdm(dataset.image_ids, desc=desc, unit="img", disable=not progress):
        run_image(predictor, dataset, image_id, encoder_only)
        if after_image is not None:
            after_image(image_id)

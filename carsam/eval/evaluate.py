"""Evaluate a (possibly quantized) SAM on a box-prompted COCO-format set: segm mAP, mAP50, mIoU.

- mAP / mAP50: each prompt box gives one mask (`multimask_output=False`, logits > 0) scored
  prompt score x SAM's predicted IoU, with the prompt's category; COCOeval over the evaluated images.
- mIoU: each non-crowd GT instance is decoded from its own GT box; the mean over all GT instances of
  IoU(predicted mask, GT mask). It isolates mask quality from the detector.
- gt_box_mAP / gt_box_mAP50: the same GT-box decodes scored as COCO results (score = SAM's predicted IoU,
  category = the GT's): CAR-SAM's protocol, measured in every run at no extra decoder cost, so one quantized
  model is scored under both protocols. With `prompt_source="gt_boxes"` it equals mAP exactly.
All values are fractions in [0, 1].
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
from segment_anything.modeling import Sam
from tqdm import tqdm

from carsam.data.coco import CocoBoxPrompts
from carsam.eval.coco_eval import mask_iou, masks_to_results, segm_map
from carsam.eval.inference import EmbeddingSource, box_predictor

logger = logging.getLogger(__name__)



@dataclasses.dataclass
class EvalResult:
    """Metrics (`eval/mAP`, `eval/mAP50`, `eval/mIoU`, `eval/gt_box_mAP`, `eval/gt_box_mAP50`, fractions in
    [0, 1]) and what they cover.

    `results`: the scored masks of the set's prompts in COCO results format (image_id, category_id, RLE
    segmentation with str counts, score), and `image_ids` the evaluated images: `segm_map(coco, results,
    image_ids)` gives mAP; `gt_box_results` the same for the GT-box decodes (gives gt_box_mAP).
    """

    metrics: dict[str, float]
    num_images: int
    num_prompts: int
    num_gt: int
    results: list[dict] = dataclasses.field(default_factory=list)
    image_ids: list[int] = dataclasses.field(default_factory=list)
    gt_box_results: list[dict] = dataclasses.field(default_factory=list)


class ScoredMasks(NamedTuple):
    """One image's decoded masks (N, H, W) bool with their COCO scores (N,) and category ids (N,)."""

    masks: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray


@dataclasses.dataclass
class _Tally:
    """Accumulates COCO results and per-GT IoUs over images. `gt_prompts`: the set's prompts are its GT boxes
    (score 1, the GT's category), so the GT-box results are the prompts' results, kept and scored once."""

    gt_prompts: bool
    results: list[dict] = dataclasses.field(default_factory=list)
    gt_box_results: list[dict] = dataclasses.field(default_factory=list)
    ious: list[float] = dataclasses.field(default_factory=list)
    image_ids: list[int] = dataclasses.field(default_factory=list)
    num_prompts: int = 0

    def __post_init__(self) -> None:
        if self.gt_prompts:
            self.gt_box_results = self.results

    def add(self, image_id: int, prompted: ScoredMasks, gt_prompted: ScoredMasks | None, gt_masks: np.ndarray) -> None:
        """Record one image: the masks of its prompts (N, H, W) and of its GT boxes (M, H, W; None when
        `gt_prompts`, the prompts are they), with scores and categories, and the GT masks (M, H, W)."""
        self.image_ids.append(image_id)
        self.num_prompts += len(prompted.masks)
        self.results.extend(masks_to_results(image_id, *prompted))
        if gt_prompted is None:
            assert self.gt_prompts, "GT-box decodes are needed unless the prompts are the GT boxes"
            gt_prompted = prompted
        else:
            self.gt_box_results.extend(masks_to_results(image_id, *gt_prompted))
        self.ious.extend(mask_iou(p, g) for p, g in zip(gt_prompted.masks, gt_masks))

    def finish(self, dataset: CocoBoxPrompts) -> EvalResult:
        segm = segm_map(dataset.coco, self.results, self.image_ids)
        gt_segm = segm if self.gt_prompts else segm_map(dataset.coco, self.gt_box_results, self.image_ids)
        miou = float(np.mean(self.ious)) if self.ious else 0.0
        metrics = {"eval/mAP": segm["mAP"], "eval/mAP50": segm["mAP50"], "eval/mIoU": miou,
                   "eval/gt_box_mAP": gt_segm["mAP"], "eval/gt_box_mAP50": gt_segm["mAP50"]}
        logger.info("evaluated %d images, %d prompts, %d GT: %s", len(self.image_ids), self.num_prompts,
                    len(self.ious), {k: round(v, 4) for k, v in metrics.items()})
        return EvalResult(metrics, len(self.image_ids), self.num_prompts, len(self.ious), self.results,
                          list(self.image_ids), self.gt_box_results)


def _chosen_ids(dataset: CocoBoxPrompts, max_images: int | None, progress: bool, desc: str) -> Iterable[int]:
    """The first `max_images` image ids of the set (all if None), wrapped in a tqdm bar if asked."""
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
    ids = dataset.image_ids[:max_images]
    return tqdm(ids, desc=desc, unit="img", disable=not progress)


def evaluate(sam: Sam, dataset: CocoBoxPrompts, *, max_images: int | None = None, progress: bool = False,
             source: EmbeddingSource | None = None, max_boxes_per_batch: int = 64) -> EvalResult:
    """Run `sam` on the set's prompts (mAP) and GT boxes (mIoU): one encoder pass per image.

    `source` may serve the image embeddings (the run's `context.embeddings`, the on-disk store of FP
    embeddings; None: the encoder).
    `max_images` evaluates the first images of the set only (mAP then covers just those).
    """
    predictor = box_predictor(sam, max_boxes_per_batch, source=source)
    tally = _Tally(gt_prompts=dataset.prompt_source == "gt_boxes")
    for image_id in _chosen_ids(dataset, max_images, progress, "eval"):
        embedding = predictor.embed_image(dataset, image_id)
        boxes, scores, category_ids = dataset.prompts(image_id)
        gt_boxes, gt_masks, gt_category_ids = dataset.ground_truth(image_id)
        masks, pred_iou = predictor.predict(embedding, boxes)
        gt_prompted = None  # GT-box prompts: decoded and scored once, above
        if not tally.gt_prompts:  # scored by predicted IoU with the GT's category
            gt_prompted = ScoredMasks(*predictor.predict(embedding, gt_boxes), gt_category_ids)
        tally.add(image_id, ScoredMasks(masks, scores * pred_iou, category_ids), gt_prompted, gt_masks)
    return tally.finish(dataset)


def boxes_to_masks(boxes_xyxy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Fill each box (N, 4) xyxy as a mask (N, H, W) bool: the pixels whose centres lie inside it.

    Pixel (r, c) covers [c, c+1) x [r, r+1), so an integer box [x0, y0, x1, y1] fills columns
    x0..x1-1 and rows y0..y1-1 exactly.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    lo = np.ceil(boxes[:, :2] - 0.5).astype(np.int64)  # first (x, y) inside
    hi = np.ceil(boxes[:, 2:] - 0.5).astype(np.int64)  # one past the last (x, y) inside
    cols, rows = np.arange(width), np.arange(height)
    in_x = (cols[None] >= lo[:, :1]) & (cols[None] < hi[:, :1])  # (N, W)
    in_y = (rows[None] >= lo[:, 1:]) & (rows[None] < hi[:, 1:])  # (N, H)
    return in_y[:, :, None] & in_x[:, None, :]


def box_as_mask_floor(dataset: CocoBoxPrompts, *, max_images: int | None = None,
                      progress: bool = False) -> EvalResult:
    """The metrics of a model that returns its box prompt, filled, as the mask (score = prompt score).

    This is what a collapsed model scores; no image is read, only prompts and GT masks.
    """
    tally = _Tally(gt_prompts=dataset.prompt_source == "gt_boxes")
    for image_id in _chosen_ids(dataset, max_images, progress, "box floor"):
        height, width = dataset.image_size(image_id)
        boxes, scores, category_ids = dataset.prompts(image_id)
        gt_boxes, gt_masks, gt_category_ids = dataset.ground_truth(image_id)
        gt_prompted = None if tally.gt_prompts else ScoredMasks(boxes_to_masks(gt_boxes, height, width),
                                                                np.ones(len(gt_boxes)), gt_category_ids)
        tally.add(image_id, ScoredMasks(boxes_to_masks(boxes, height, width), scores, category_ids), gt_prompted,
                  gt_masks)
    return tally.finish(dataset)

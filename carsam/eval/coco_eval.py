"""COCO instance-segmentation metrics: results in RLE, segm mAP via pycocotools, and mask IoU.

All metric values are fractions in [0, 1]; tables show them x100.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

logger = logging.getLogger(__name__)


def masks_to_results(image_id: int, masks: np.ndarray, scores: np.ndarray,
                     category_ids: np.ndarray) -> list[dict]:
    """COCO results (one dict per mask) with RLE segmentations whose `counts` are str.

    masks: (N, H, W) bool; scores: (N,) float; category_ids: (N,) int. N = 0 gives [].
    """
    masks = np.asarray(masks, dtype=bool)
    if len(masks) == 0:
        return []
    if not len(masks) == len(scores) == len(category_ids):
        raise ValueError(f"got {len(masks)} masks, {len(scores)} scores, {len(category_ids)} category ids")
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return [{"image_id": int(image_id), "category_id": int(c), "segmentation": rle, "score": float(s)}
            for rle, s, c in zip(rles, scores, category_ids)]


def _gt_view(coco_gt: COCO, image_ids: Sequence[int]) -> COCO:
    """A COCO index over `image_ids` only, with shallow copies of their annotations.

    COCOeval rewrites GT annotations in place (polygons -> RLE, an `ignore` flag); the copies keep
    the caller's `coco_gt` untouched.
    """
    wanted = set(image_ids)
    view = COCO()
    view.dataset = {
        "images": [img for img in coco_gt.dataset["images"] if img["id"] in wanted],
        "annotations": [dict(a) for i in wanted for a in coco_gt.imgToAnns.get(i, [])],
        "categories": coco_gt.dataset["categories"],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        view.createIndex()
    return view


def segm_map(coco_gt: COCO, results: list[dict], image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """COCO segm mAP (IoU 0.50:0.95) and mAP50 of `results`, as fractions in [0, 1] (tables show x100).

    The evaluation covers `image_ids` (default: every image of `coco_gt`), so GT on evaluated images
    without results counts as missed; results on other images raise ValueError. Empty results, or no
    GT at all, give 0.0. `coco_gt` is not modified. pycocotools' console output is logged at DEBUG.
    """
    ids = sorted(coco_gt.imgs) if image_ids is None else sorted({int(i) for i in image_ids})
    stray = sorted({r["image_id"] for r in results} - set(ids))
    if stray:
        raise ValueError(f"results name image ids outside the evaluated set (e.g. {stray[:5]})")
    if not results:
        logger.info("segm_map: no results, mAP = mAP50 = 0")
        return {"mAP": 0.0, "mAP50": 0.0}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        gt = _gt_view(coco_gt, ids)
        evaluator = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "segm")  # loadRes writes into dicts
        evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    logger.debug("pycocotools segm evaluation:\n%s", log.getvalue())
    stats = evaluator.stats  # -1 where no GT exists
    return {"mAP": max(float(stats[0]), 0.0), "mAP50": max(float(stats[1]), 0.0)}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape (H, W).

    Two empty masks agree perfectly, so their IoU is 1.0 (this keeps `mask_iou(m, m) == 1` for every
    mask; GT instances have non-empty masks, so mIoU should never meet it).
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union

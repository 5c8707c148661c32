"""The protocol's instance score is detector score x SAM's predicted IoU, with the prompt's category; a GT-box
decode (eval/gt_box_mAP) is scored by the predicted IoU with the GT's category."""

from __future__ import annotations

import numpy as np
import pytest

from carsam.data.coco import CocoBoxPrompts
from carsam.eval import evaluate as evaluate_module
from carsam.eval.evaluate import boxes_to_masks


class _GroundTruthPredictor:
    """Returns each box filled as its mask and a fixed predicted IoU of 0.5."""

    def __init__(self, sam, max_boxes_per_batch=64, source=None):
        pass

    def embed(self, image):
        return image.shape[:2]

    def embed_image(self, dataset, image_id):
        return self.embed(dataset.load_image(image_id))

    def predict(self, size, boxes):
        return boxes_to_masks(boxes, *size), np.full(len(boxes), 0.5, dtype=np.float32)


def test_results_are_scored_detector_score_times_predicted_iou(monkeypatch, small_coco):
    data = CocoBoxPrompts(small_coco["images"], small_coco["annotations"], small_coco["prompts"])
    captured: list[list[dict]] = []  # the prompts' results, then the GT-box decodes'

    def fake_segm_map(coco, results, image_ids):
        captured.append(results)
        return {"mAP": 0.0, "mAP50": 0.0}

    monkeypatch.setattr(evaluate_module, "box_predictor", _GroundTruthPredictor)
    monkeypatch.setattr(evaluate_module, "segm_map", fake_segm_map)
    evaluate_module.evaluate(sam=None, dataset=data)
    expected = []
    for image_id in data.image_ids:
        _, scores, cats = data.prompts(image_id)
        expected += [(image_id, int(c), pytest.approx(0.5 * float(s))) for s, c in zip(scores, cats)]
    got = [(r["image_id"], r["category_id"], r["score"]) for r in captured[0]]
    assert got == expected and len(got) == data.num_prompts > 0
    gt_expected = [(image_id, int(c), 0.5) for image_id in data.image_ids for c in data.ground_truth(image_id)[2]]
    assert [(r["image_id"], r["category_id"], r["score"]) for r in captured[1]] == gt_expected  # IoU x GT category

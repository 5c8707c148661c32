"""evaluate() end to end on the testbed, and the box-as-mask floor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from carsam.data.coco import CocoBoxPrompts
from carsam.data.synthetic import SyntheticSpec, generate_split
from carsam.eval.evaluate import EvalResult, box_as_mask_floor, boxes_to_masks, evaluate
from carsam.testbed.spec import build_testbed_sam

METRIC_KEYS = {"eval/mAP", "eval/mAP50", "eval/mIoU", "eval/gt_box_mAP", "eval/gt_box_mAP50"}


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_split(SyntheticSpec(seed=1, num_images=(("val", 3),)), "val", tmp_path_factory.mktemp("syn"))


@pytest.fixture(scope="module")
def detector_set(paths) -> CocoBoxPrompts:
    return CocoBoxPrompts(paths["images"], paths["annotations"], paths["prompts"])


@pytest.fixture(scope="module")
def gt_box_set(paths) -> CocoBoxPrompts:
    return CocoBoxPrompts(paths["images"], paths["annotations"], None, prompt_source="gt_boxes")


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return build_testbed_sam()


def test_integer_box_fills_exactly_its_pixels():
    masks = boxes_to_masks(np.array([[2, 1, 5, 3]]), height=4, width=6)
    expected = np.zeros((1, 4, 6), bool)
    expected[0, 1:3, 2:5] = True
    np.testing.assert_array_equal(masks, expected)


def test_fractional_box_fills_the_pixels_whose_centres_are_inside():
    masks = boxes_to_masks(np.array([[0.6, 0.4, 2.5, 1.6]]), height=3, width=4)
    expected = np.zeros((1, 3, 4), bool)
    expected[0, 0:2, 1:2] = True  # x centres 1.5 inside [0.6, 2.5); 2.5 is not; y centres 0.5, 1.5
    np.testing.assert_array_equal(masks, expected)


def test_box_floor_miou_on_gt_boxes_is_the_mean_box_to_mask_iou(gt_box_set, paths):
    annotations = json.loads(paths["annotations"].read_text())["annotations"]
    # A synthetic GT box is the tight integer box of its mask, so IoU(box, mask) = area / box area.
    expected = np.mean([a["area"] / (a["bbox"][2] * a["bbox"][3]) for a in annotations])
    floor = box_as_mask_floor(gt_box_set)
    assert floor.num_gt == len(annotations) and floor.num_prompts == len(annotations)
    assert floor.metrics["eval/mIoU"] == pytest.approx(expected)


def test_box_floor_miou_does_not_depend_on_the_prompt_source(gt_box_set, detector_set):
    detector_floor = box_as_mask_floor(detector_set)
    assert detector_floor.metrics["eval/mIoU"] == pytest.approx(box_as_mask_floor(gt_box_set).metrics["eval/mIoU"])
    assert set(detector_floor.metrics) == METRIC_KEYS


def test_evaluate_runs_end_to_end_with_metrics_in_unit_range(sam, detector_set):
    result = evaluate(sam, detector_set, max_images=2)
    assert isinstance(result, EvalResult) and set(result.metrics) == METRIC_KEYS
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    first_two = detector_set.image_ids[:2]
    assert result.num_images == 2
    assert result.num_prompts == sum(len(detector_set.prompts(i)[0]) for i in first_two)
    assert result.num_gt == sum(len(detector_set.ground_truth(i)[0]) for i in first_two)


def test_evaluate_encodes_each_image_once_through_its_source(sam, detector_set):
    calls = []

    class CountingSource:
        def embed(self, predictor, dataset, image_id):
            calls.append(image_id)
            return predictor.embed(dataset.load_image(image_id))

    with_hook = evaluate(sam, detector_set, max_images=2, source=CountingSource())
    assert calls == detector_set.image_ids[:2]
    assert with_hook.metrics == pytest.approx(evaluate(sam, detector_set, max_images=2).metrics)


def test_evaluate_miou_is_the_same_for_detector_and_gt_box_prompts(sam, detector_set, gt_box_set):
    detector = evaluate(sam, detector_set, max_images=1)
    gt_boxes = evaluate(sam, gt_box_set, max_images=1)
    assert detector.metrics["eval/mIoU"] == pytest.approx(gt_boxes.metrics["eval/mIoU"])


def test_gt_box_map_of_a_detector_run_is_the_gt_box_protocols_map(sam, detector_set, gt_box_set):
    """One detector-prompted evaluation also scores CAR-SAM's protocol: its GT-box mAP equals the mAP of the
    GT-box-prompted evaluation (which equals its own GT-box mAP), and differs from the detector mAP."""
    detector, gt_boxes = evaluate(sam, detector_set), evaluate(sam, gt_box_set)
    assert gt_boxes.metrics["eval/gt_box_mAP"] == gt_boxes.metrics["eval/mAP"]
    assert gt_boxes.metrics["eval/gt_box_mAP50"] == gt_boxes.metrics["eval/mAP50"]
    assert detector.metrics["eval/gt_box_mAP"] == pytest.approx(gt_boxes.metrics["eval/mAP"], abs=1e-12)
    assert detector.metrics["eval/gt_box_mAP50"] == pytest.approx(gt_boxes.metrics["eval/mAP50"], abs=1e-12)
    assert len(detector.gt_box_results) == detector.num_gt and detector.gt_box_results != detector.results


def test_box_floor_scores_gt_boxes_by_their_filled_boxes(gt_box_set, detector_set):
    floor_detector, floor_gt = box_as_mask_floor(detector_set), box_as_mask_floor(gt_box_set)
    assert floor_detector.metrics["eval/gt_box_mAP"] == pytest.approx(floor_gt.metrics["eval/mAP"], abs=1e-12)
    assert floor_gt.metrics["eval/mAP"] > 0  # a filled tight GT box overlaps its mask: a non-trivial answer
    assert floor_detector.metrics["eval/mAP"] != floor_detector.metrics["eval/gt_box_mAP"]

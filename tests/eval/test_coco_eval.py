"""COCO results encoding, segm mAP through pycocotools, and mask IoU."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from carsam.data.coco import CocoBoxPrompts
from carsam.data.synthetic import SyntheticSpec, generate_split
from carsam.eval.coco_eval import mask_iou, masks_to_results, segm_map


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> CocoBoxPrompts:
    paths = generate_split(SyntheticSpec(seed=3, num_images=(("val", 4),)), "val", tmp_path_factory.mktemp("syn"))
    return CocoBoxPrompts(paths["images"], paths["annotations"], paths["prompts"])


def _gt_results(dataset: CocoBoxPrompts, keep=lambda ann: True) -> list[dict]:
    """The GT masks themselves as results with score 1 (only the annotations `keep` accepts)."""
    results = []
    for image_id in dataset.image_ids:
        _, masks, category_ids = dataset.ground_truth(image_id)
        chosen = np.array([keep(a) for a in dataset.coco.imgToAnns[image_id]], dtype=bool)
        results += masks_to_results(image_id, masks[chosen], np.ones(chosen.sum()), category_ids[chosen])
    return results


def test_masks_to_results_round_trips_through_rle_with_str_counts():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 7, 11)) > 0.5
    results = masks_to_results(5, masks, np.array([0.1, 0.2, 0.3]), np.array([1, 2, 3]))
    json.dumps(results)  # serialisable
    assert [r["category_id"] for r in results] == [1, 2, 3] and results[0]["image_id"] == 5
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    decoded = np.stack([mask_utils.decode(r["segmentation"]) for r in results]).astype(bool)
    np.testing.assert_array_equal(decoded, masks)


def test_masks_to_results_of_no_masks_is_empty():
    assert masks_to_results(1, np.zeros((0, 4, 4), bool), np.zeros(0), np.zeros(0, np.int64)) == []


def test_gt_masks_as_results_score_one(dataset):
    metrics = segm_map(dataset.coco, _gt_results(dataset))
    assert metrics == {"mAP": pytest.approx(1.0), "mAP50": pytest.approx(1.0)}


def test_empty_results_score_zero(dataset):
    assert segm_map(dataset.coco, []) == {"mAP": 0.0, "mAP50": 0.0}


def _expected_ap_half(dataset: CocoBoxPrompts, keep) -> float:
    """COCO AP when a subset of GT is predicted perfectly and nothing else: per category, precision
    is 1 up to recall k/n and 0 after, so AP = #(101 recall thresholds <= k/n) / 101 (0 if k = 0)."""
    thresholds = np.linspace(0.0, 1.0, 101)
    aps = []
    for cat in sorted({a["category_id"] for a in dataset.coco.anns.values()}):
        anns = [a for a in dataset.coco.anns.values() if a["category_id"] == cat]
        k, n = sum(keep(a) for a in anns), len(anns)
        aps.append(np.count_nonzero(thresholds <= k / n) / 101 if k else 0.0)
    return float(np.mean(aps))


def test_half_the_instances_predicted_perfectly_score_the_computed_ap(dataset):
    keep = lambda ann: ann["id"] % 2 == 0  # noqa: E731
    metrics = segm_map(dataset.coco, _gt_results(dataset, keep))
    expected = _expected_ap_half(dataset, keep)
    assert 0.0 < metrics["mAP50"] < 1.0
    assert metrics["mAP"] == pytest.approx(expected) and metrics["mAP50"] == pytest.approx(expected)


def test_segm_map_covers_only_the_given_image_ids(dataset):
    first = [r for r in _gt_results(dataset) if r["image_id"] == dataset.image_ids[0]]
    only_first = segm_map(dataset.coco, first, image_ids=dataset.image_ids[:1])
    assert only_first == {"mAP": pytest.approx(1.0), "mAP50": pytest.approx(1.0)}
    assert segm_map(dataset.coco, first)["mAP"] < 1.0  # the other images' GT are misses


def test_results_outside_the_evaluated_images_are_an_error(dataset):
    with pytest.raises(ValueError, match="outside the evaluated set"):
        segm_map(dataset.coco, _gt_results(dataset), image_ids=dataset.image_ids[:1])


def test_segm_map_leaves_the_ground_truth_untouched(dataset):
    before = copy.deepcopy(dataset.coco.dataset)
    segm_map(dataset.coco, _gt_results(dataset))
    assert dataset.coco.dataset == before


def test_segm_map_does_not_modify_the_results(dataset):
    results = _gt_results(dataset)
    before = copy.deepcopy(results)
    segm_map(dataset.coco, results)
    assert results == before


def test_mask_iou_of_hand_built_masks():
    a = np.zeros((4, 4), bool)
    a[0:2, 0:2] = True
    shifted = np.roll(a, 1, axis=1)  # overlaps a in 2 pixels, union 6
    apart = np.roll(a, 2, axis=0)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, shifted) == pytest.approx(2 / 6)
    assert mask_iou(a, apart) == 0.0
    assert mask_iou(a, np.ones((4, 4), bool)) == pytest.approx(4 / 16)


def test_mask_iou_of_two_empty_masks_is_one():
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0


def test_mask_iou_rejects_different_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(np.zeros((3, 3), bool), np.zeros((3, 4), bool))


def test_segm_map_values_are_fractions(dataset):
    keep = lambda ann: ann["id"] % 3 == 0  # noqa: E731
    values = segm_map(dataset.coco, _gt_results(dataset, keep)).values()
    assert all(0.0 <= v <= 1.0 for v in values)


def test_fixture_has_several_categories(dataset):
    """The partial-AP test is only meaningful with several categories and instances."""
    assert len({a["category_id"] for a in dataset.coco.anns.values()}) >= 3

"""The synthetic dataset is deterministic by seed and is valid COCO with 1-6 visible instances per image."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from pycocotools import mask as mask_utils

from carsam.data.synthetic import CATEGORIES, SyntheticSpec, ensure_dataset, generate_split, jitter_box, render_image, split_rng

SPEC = SyntheticSpec(seed=3, num_images=(("train", 0), ("calib", 3), ("val", 12)))


def _digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_identical_files(tmp_path):
    generate_split(SPEC, "val", tmp_path / "a")
    generate_split(SPEC, "val", tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_other_seed_gives_other_images():
    a, _ = render_image(split_rng(0, "val", 0), SPEC)
    b, _ = render_image(split_rng(1, "val", 0), SPEC)
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_splits_are_independent_streams():
    a, _ = render_image(split_rng(0, "calib", 0), SPEC)
    b, _ = render_image(split_rng(0, "val", 0), SPEC)
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_annotations_are_valid_coco_with_visible_rle_masks(tmp_path):
    paths = generate_split(SPEC, "val", tmp_path)
    coco = json.loads(paths["annotations"].read_text())
    assert [c["name"] for c in coco["categories"]] == list(CATEGORIES)
    per_image: dict[int, int] = {}
    for ann in coco["annotations"]:
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        ys, xs = np.nonzero(mask)
        assert ann["area"] == mask.sum() >= SPEC.min_area and ann["iscrowd"] == 0
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    assert set(per_image) == {im["id"] for im in coco["images"]}
    assert all(1 <= n <= SPEC.max_instances for n in per_image.values())


def test_visible_masks_of_one_image_do_not_overlap():
    for index in range(10):
        _, instances = render_image(split_rng(5, "val", index), SPEC)
        coverage = np.sum([inst.mask for inst in instances], axis=0)
        assert coverage.max() <= 1


def test_prompts_are_detection_results_with_misses_and_false_positives(tmp_path):
    spec = SyntheticSpec(seed=1, num_images=(("train", 0), ("calib", 0), ("val", 60)))
    paths = generate_split(spec, "val", tmp_path)
    coco = json.loads(paths["annotations"].read_text())
    prompts = json.loads(paths["prompts"].read_text())
    assert all(set(p) == {"image_id", "category_id", "bbox", "score"} for p in prompts)
    assert all(0 < p["score"] < 1 and p["bbox"][2] > 0 and p["bbox"][3] > 0 for p in prompts)
    n_gt = len(coco["annotations"])
    low = sum(p["score"] < 0.5 for p in prompts)
    assert low > 0 and len(prompts) != n_gt  # false positives and misses both occur


def test_jittered_boxes_stay_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y, w, h = jitter_box(rng, [5.0, 5.0, 30.0, 20.0], 0.5, 32, 40)  # h=32, w=40
        assert 0 <= x and 0 <= y and x + w <= 40 + 1e-6 and y + h <= 32 + 1e-6 and w > 0 and h > 0


def test_ensure_dataset_generates_once(tmp_path):
    root = ensure_dataset(SPEC, tmp_path, ("calib",))
    stamp = (root / "instances_calib.json").stat().st_mtime_ns
    ensure_dataset(SPEC, tmp_path, ("calib",))
    assert (root / "instances_calib.json").stat().st_mtime_ns == stamp


def test_the_glyphs_family_draws_its_own_shapes_sizes_and_counts(tmp_path):
    from carsam.data.synthetic import FAMILIES, dataset_dir

    spec = SyntheticSpec.for_family("glyphs", 1)
    spec = SyntheticSpec(**{**spec.__dict__, "num_images": (("train", 0), ("calib", 0), ("val", 16))})
    coco = json.loads(generate_split(spec, "val", tmp_path)["annotations"].read_text())
    assert [c["name"] for c in coco["categories"]] == list(FAMILIES["glyphs"].categories)
    assert set(FAMILIES["glyphs"].categories).isdisjoint(CATEGORIES)
    assert all(112 <= im["height"] <= 176 and 112 <= im["width"] <= 176 for im in coco["images"])
    assert coco["info"]["family"] == "glyphs" and "family" not in _shapes_info(tmp_path)
    per_image: dict[int, int] = {}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    assert max(per_image.values()) <= 8
    assert dataset_dir("d", 1, "glyphs").name == "testbed-glyphs-seed1" and dataset_dir("d", 0).name == "testbed-seed0"
    assert SyntheticSpec.for_family("shapes", 0) == SyntheticSpec()


def _shapes_info(tmp_path) -> dict:
    return json.loads(generate_split(SPEC, "val", tmp_path / "shapes")["annotations"].read_text())["info"]


def test_an_unknown_family_is_refused_with_the_choices():
    import pytest

    from carsam.config import ConfigError, DataConfig

    with pytest.raises(ValueError, match="unknown synthetic family 'stars'.*glyphs"):
        SyntheticSpec.for_family("stars", 0)
    with pytest.raises(ConfigError, match="data.synthetic_family must be one of"):
        DataConfig(synthetic_family="stars")

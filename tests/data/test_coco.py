"""CocoBoxPrompts: validation errors that name the culprit, lazy samples, subsets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from carsam.data.coco import CocoBoxPrompts, DatasetError, ImageSample
from carsam.data.synthetic import SyntheticSpec, generate_split


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4-image synthetic val split (images, annotations, detector prompts)."""
    root = tmp_path_factory.mktemp("synthetic")
    return generate_split(SyntheticSpec(seed=0, num_images=(("val", 4),)), "val", root)


def _annotations(split: dict[str, Path]) -> dict:
    return json.loads(split["annotations"].read_text())


def _prompts(split: dict[str, Path]) -> list[dict]:
    return json.loads(split["prompts"].read_text())


def _write(path: Path, obj: object) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def _load(split: dict[str, Path], **overrides) -> CocoBoxPrompts:
    kwargs = {"images_dir": split["images"], "annotations_file": split["annotations"],
              "prompts_file": split["prompts"], **overrides}
    return CocoBoxPrompts(**kwargs)


def test_missing_annotations_file_names_the_path(split, tmp_path):
    with pytest.raises(DatasetError, match="nope.json"):
        _load(split, annotations_file=tmp_path / "nope.json")


def test_annotations_that_are_not_json_name_the_path(split, tmp_path):
    with pytest.raises(DatasetError, match="broken.json.*not valid JSON"):
        _load(split, annotations_file=_write(tmp_path / "broken.json", "{images: "))


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_annotations_missing_a_key_name_the_key(split, tmp_path, key):
    data = {k: v for k, v in _annotations(split).items() if k != key}
    with pytest.raises(DatasetError, match=rf"lacks key\(s\) \['{key}'\]"):
        _load(split, annotations_file=_write(tmp_path / "a.json", data))


def test_unknown_prompt_source_is_named(split):
    with pytest.raises(DatasetError, match="'points'"):
        _load(split, prompt_source="points")


def test_detector_source_without_prompts_file_says_so(split):
    with pytest.raises(DatasetError, match="needs a prompts file"):
        _load(split, prompts_file=None)


def test_missing_prompts_file_names_the_path(split, tmp_path):
    with pytest.raises(DatasetError, match="dets.json"):
        _load(split, prompts_file=tmp_path / "dets.json")


def test_prompts_that_are_not_a_list_say_so(split, tmp_path):
    with pytest.raises(DatasetError, match="JSON list"):
        _load(split, prompts_file=_write(tmp_path / "p.json", {"image_id": 1}))


@pytest.mark.parametrize("change, message", [
    (lambda e: e.pop("score"), r"entry 2 lacks field\(s\) \['score'\]"),
    (lambda e: e.update(bbox=[1.0, 2.0, 0.0, 5.0]), "entry 2 has non-positive width/height"),
    (lambda e: e.update(bbox=[1.0, 2.0, -3.0, 5.0]), "entry 2 has non-positive width/height"),
    (lambda e: e.update(score=float("nan")), "entry 2 has a non-finite"),
    (lambda e: e.update(bbox=[1.0, float("inf"), 3.0, 5.0]), "entry 2 has a non-finite"),
    (lambda e: e.update(bbox=[1.0, 2.0, 3.0]), "entry 2 has bbox"),
])
def test_bad_prompt_entry_is_named_by_index(split, tmp_path, change, message):
    entries = _prompts(split)
    change(entries[2])
    with pytest.raises(DatasetError, match=message):
        _load(split, prompts_file=_write(tmp_path / "p.json", entries))


def test_prompts_for_unknown_images_list_the_ids(split, tmp_path):
    entries = _prompts(split) + [dict(_prompts(split)[0], image_id=777), dict(_prompts(split)[0], image_id=778)]
    with pytest.raises(DatasetError, match=r"2 image id\(s\) absent.*\[777, 778\]"):
        _load(split, prompts_file=_write(tmp_path / "p.json", entries))


def test_prompts_with_unknown_categories_name_the_category(split, tmp_path):
    entries = _prompts(split) + [dict(_prompts(split)[0], category_id=0)]
    with pytest.raises(DatasetError, match=r"category id\(s\) \[0\]"):
        _load(split, prompts_file=_write(tmp_path / "p.json", entries))


def test_missing_image_files_name_the_first_and_the_count(split, tmp_path):
    data = _annotations(split)
    for img in data["images"][1:3]:
        img["file_name"] = f"gone_{img['id']}.png"
    with pytest.raises(DatasetError, match=r"2 of 4 image file\(s\) missing, first: .*gone_2.png"):
        _load(split, annotations_file=_write(tmp_path / "a.json", data))


def test_image_whose_size_disagrees_with_the_annotations_is_named(split, tmp_path):
    data = _annotations(split)
    data["images"][0]["height"] += 1
    for ann in data["annotations"]:  # keep the masks consistent with the entry: only the image file disagrees
        if ann["image_id"] == data["images"][0]["id"] and isinstance(ann["segmentation"], dict):
            ann["segmentation"] = {**ann["segmentation"], "size": [data["images"][0]["height"],
                                                                    data["images"][0]["width"]]}
    with pytest.raises(DatasetError, match=rf"{data['images'][0]['file_name']} is .* but the annotations say"):
        _load(split, annotations_file=_write(tmp_path / "a.json", data))  # found when the set is built


def test_empty_selection_is_an_error(split):
    with pytest.raises(DatasetError, match="empty"):
        _load(split, image_ids=[])


def test_unknown_selected_image_ids_are_named(split):
    with pytest.raises(DatasetError, match=r"\[99\]"):
        _load(split, image_ids=[1, 99])


def test_subset_larger_than_the_set_is_an_error(split):
    with pytest.raises(DatasetError, match=r"\[1, 4\].*got 5"):
        _load(split).subset(5, seed=0)


def test_samples_have_documented_shapes_and_dtypes(split):
    sample = _load(split)[0]
    h, w = sample.image.shape[:2]
    n, m = len(sample.boxes), len(sample.gt_boxes)
    assert isinstance(sample, ImageSample)
    assert sample.image.shape == (h, w, 3) and sample.image.dtype == np.uint8
    assert sample.boxes.shape == (n, 4) and sample.boxes.dtype == np.float32
    assert sample.scores.shape == (n,) and sample.category_ids.dtype == np.int64
    assert sample.gt_masks.shape == (m, h, w) and sample.gt_masks.dtype == bool
    assert sample.gt_category_ids.shape == (m,) and sample.gt_category_ids.dtype == np.int64


def test_gt_masks_decode_to_the_annotated_areas_and_boxes(split):
    dataset = _load(split)
    by_image = {}
    for ann in _annotations(split)["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for sample in dataset:
        anns = by_image[sample.image_id]
        assert sample.gt_masks.sum(axis=(1, 2)).tolist() == [a["area"] for a in anns]
        expected = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        np.testing.assert_allclose(sample.gt_boxes, expected)
        for mask, ann in zip(sample.gt_masks, anns):
            assert np.array_equal(mask, mask_utils.decode(ann["segmentation"]).astype(bool))


def test_detector_prompts_are_the_file_boxes_in_xyxy(split):
    sample = _load(split)[1]
    entries = [e for e in _prompts(split) if e["image_id"] == sample.image_id]
    expected = np.array([[x, y, x + w, y + h] for x, y, w, h in (e["bbox"] for e in entries)], dtype=np.float32)
    np.testing.assert_allclose(sample.boxes, expected, rtol=1e-6)
    np.testing.assert_allclose(sample.scores, [e["score"] for e in entries], rtol=1e-6)
    assert sample.category_ids.tolist() == [e["category_id"] for e in entries]


def test_gt_box_prompts_equal_the_gt_boxes_with_score_one(split):
    dataset = _load(split, prompts_file=None, prompt_source="gt_boxes")
    for sample in dataset:
        np.testing.assert_array_equal(sample.boxes, sample.gt_boxes)
        np.testing.assert_array_equal(sample.category_ids, sample.gt_category_ids)
        assert np.all(sample.scores == 1.0)


def test_images_without_prompts_are_kept_with_their_gt(split, tmp_path):
    entries = [e for e in _prompts(split) if e["image_id"] != 3]
    dataset = _load(split, prompts_file=_write(tmp_path / "p.json", entries))
    assert dataset.image_ids == [1, 2, 3, 4]
    sample = dataset.get(3)
    assert sample.boxes.shape == (0, 4) and len(sample.gt_masks) > 0


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_images_load_as_rgb(split, tmp_path, mode):
    data = _annotations(split)
    info = data["images"][0]
    rgb = np.asarray(Image.open(split["images"] / info["file_name"]))
    for img in data["images"]:
        Image.open(split["images"] / img["file_name"]).convert(mode).save(tmp_path / img["file_name"])
    dataset = _load(split, images_dir=tmp_path)
    image = dataset.load_image(info["id"])
    assert image.shape == rgb.shape and image.dtype == np.uint8
    if mode == "RGBA":
        np.testing.assert_array_equal(image, rgb)


def test_subset_is_deterministic_sorted_and_inside_the_set(split):
    dataset = _load(split)
    first, again = dataset.subset(3, seed=7), dataset.subset(3, seed=7)
    assert first.image_ids == again.image_ids == sorted(first.image_ids)
    assert set(first.image_ids) <= set(dataset.image_ids) and len(first) == 3
    assert dataset.subset(4, seed=1).image_ids == dataset.image_ids


def test_coco_index_covers_all_annotations(split):
    dataset = _load(split)
    assert len(dataset.coco.anns) == len(_annotations(split)["annotations"])
    assert len(dataset) == 4 and dataset.num_prompts == len(_prompts(split))

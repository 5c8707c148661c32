"""A COCO-format image set with box prompts: the evaluation (and calibration) data of the protocol.

The prompts of an image are either a detector's boxes (a COCO detection-results file: a JSON list of
`{image_id, category_id, bbox [x, y, w, h], score}`) or the image's ground-truth boxes (score 1).
Everything is validated when the set is built, with `DatasetError`s that say what to fix; images and
masks are read lazily, per sample, so the 5000 images of COCO val2017 cost only their annotations.

Crowd annotations (`iscrowd=1`) are neither prompts nor mIoU targets; COCOeval ignores them too.
Images without prompts are kept: they add nothing to mAP, but their ground truth counts as misses.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from carsam.files import memoised_file_sha256

logger = logging.getLogger(__name__)

PROMPT_SOURCES = ("detector", "gt_boxes")
_REQUIRED_KEYS = ("images", "annotations", "categories")
_PROMPT_FIELDS = ("image_id", "category_id", "bbox", "score")
SUPPORTED_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "I;16", "I;16L", "I;16B")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B")


class DatasetError(ValueError):
    """A dataset file or argument is unusable; the message says which and what to fix."""


@dataclasses.dataclass
class ImageSample:
    """One image with its prompts (N boxes) and its non-crowd ground truth (M instances).

    image: (H, W, 3) uint8 RGB. boxes: (N, 4) float32 xyxy pixels; scores: (N,) float32;
    category_ids: (N,) int64. gt_boxes: (M, 4) float32 xyxy; gt_masks: (M, H, W) bool;
    gt_category_ids: (M,) int64.
    """

    image_id: int
    image: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    gt_boxes: np.ndarray
    gt_masks: np.ndarray
    gt_category_ids: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Prompts:
    """All prompts of the set, sorted by image id; `spans[image_id] = (start, stop)` rows."""

    boxes: np.ndarray  # (P, 4) float32 xyxy
    scores: np.ndarray  # (P,) float32
    category_ids: np.ndarray  # (P,) int64
    spans: dict[int, tuple[int, int]]


def _read_json(path: Path, what: str, option: str) -> object:
    if not path.is_file():
        raise DatasetError(f"{what} file not found: {path} (set {option} to an existing JSON file)")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{what} file {path} is not valid JSON ({err}); re-export it") from err


def _load_coco(annotations_file: Path) -> COCO:
    """Read a COCO instances file into an indexed `COCO` object without pycocotools' prints."""
    data = _read_json(annotations_file, "annotations", "data.annotations")
    if not isinstance(data, dict):
        raise DatasetError(f"annotations file {annotations_file} must hold a JSON object, "
                           f"got {type(data).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise DatasetError(f"annotations file {annotations_file} lacks key(s) {missing}; "
                           "it must be a COCO instances file with 'images', 'annotations', 'categories'")
    _check_entries(data, annotations_file)
    _check_annotations(data, annotations_file)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


_ENTRY_FIELDS = {"images": ("id", "file_name", "height", "width"),
                 "annotations": ("id", "image_id", "category_id", "bbox", "segmentation"),
                 "categories": ("id",)}


def _check_entries(data: dict, annotations_file: Path) -> None:
    """Every image, annotation and category entry is an object with the fields carsam reads."""
    for key, fields in _ENTRY_FIELDS.items():
        if not isinstance(data[key], list):
            raise DatasetError(f"annotations file {annotations_file}: '{key}' must be a list")
        for index, entry in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise DatasetError(f"annotations file {annotations_file}: {key}[{index}] lacks field(s) {missing}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _annotation_problem(ann: dict, image: dict | None, categories: set) -> str | None:
    """Why one GT annotation is unusable, or None."""
    if image is None:
        return f"names image_id {ann['image_id']!r}, which is not in 'images'"
    if ann["category_id"] not in categories:
        return f"has category_id {ann['category_id']!r}, which is not in 'categories' (it would be dropped from mAP)"
    bbox = ann["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) and math.isfinite(v) for v in bbox):
        return f"has bbox {bbox!r}, not 4 finite numbers [x, y, w, h]"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"has a box of non-positive width or height {bbox} (it would be an inverted prompt)"
    segmentation = ann["segmentation"]
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        if list(size or []) != [image["height"], image["width"]]:
            return (f"has an RLE mask of size {size} (HxW) but its image is {image['height']}x{image['width']}; "
                    "re-export the mask at the image's size")
    elif not isinstance(segmentation, list) or not segmentation:
        return "has no usable segmentation (an RLE object or a non-empty list of polygons)"
    return None


def _check_annotations(data: dict, annotations_file: Path) -> None:
    """Every GT annotation names a known image and category, has a positive finite box and a mask of its
    image's size; `area` and `iscrowd`, which COCOeval needs, are filled in (mask area, 0) with a warning
    where missing, as COCO's own tools do."""
    images = {img["id"]: img for img in data["images"]}
    categories = {cat["id"] for cat in data["categories"]}
    filled = 0
    for ann in data["annotations"]:
        problem = _annotation_problem(ann, images.get(ann["image_id"]), categories)
        if problem:
            raise DatasetError(f"annotations file {annotations_file}: annotation id {ann['id']!r} {problem}")
        if "iscrowd" not in ann or "area" not in ann:
            image = images[ann["image_id"]]
            ann.setdefault("iscrowd", 0)
            if "area" not in ann:
                segmentation = ann["segmentation"]
                rles = segmentation if isinstance(segmentation, dict) else mask_utils.merge(
                    mask_utils.frPyObjects(segmentation, image["height"], image["width"]))
                if isinstance(rles, dict) and isinstance(rles.get("counts"), list):  # uncompressed RLE
                    rles = mask_utils.frPyObjects(rles, image["height"], image["width"])
                ann["area"] = float(mask_utils.area(rles))
            filled += 1
    if filled:
        logger.warning("annotations file %s: %d annotation(s) lacked 'area' or 'iscrowd'; filled in (mask area, "
                       "iscrowd 0)", annotations_file, filled)


def _prompt_problem(entry: object) -> str | None:
    """Why one detection-results entry is unusable, or None if it is fine."""
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    missing = [key for key in _PROMPT_FIELDS if key not in entry]
    if missing:
        return f"lacks field(s) {missing}"
    bbox = entry["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return f"has bbox {bbox!r}, not a list of 4 numbers [x, y, w, h]"
    if not _is_number(entry["score"]) or not all(math.isfinite(v) for v in [*bbox, entry["score"]]):
        return f"has a non-finite or non-numeric bbox/score ({bbox}, {entry['score']!r})"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"has non-positive width/height in bbox {bbox}"
    if not 0.0 <= entry["score"] <= 1.0:
        return f"has score {entry['score']!r} outside [0, 1] (detector scores are confidences; rescale them)"
    if not isinstance(entry["image_id"], int) or not isinstance(entry["category_id"], int):
        return "has a non-integer image_id or category_id"
    return None


def _validate_prompts(entries: object, path: Path, coco: COCO) -> list[dict]:
    """Check every entry's fields, and that its image and category exist in the annotations."""
    if not isinstance(entries, list):
        raise DatasetError(f"prompts file {path} must hold a JSON list of detections, "
                           f"got {type(entries).__name__}")
    for index, entry in enumerate(entries):
        problem = _prompt_problem(entry)
        if problem:
            raise DatasetError(f"prompts file {path}: entry {index} {problem}")
    unknown_images = sorted({e["image_id"] for e in entries} - set(coco.imgs))
    if unknown_images:
        raise DatasetError(f"prompts file {path} names {len(unknown_images)} image id(s) absent from the "
                           f"annotations (e.g. {unknown_images[:5]}); use the annotations of the same split")
    unknown_cats = sorted({e["category_id"] for e in entries} - set(coco.cats))
    if unknown_cats:
        raise DatasetError(f"prompts file {path} uses category id(s) {unknown_cats[:5]} absent from the "
                           f"annotations (known: {sorted(coco.cats)[:10]}...); map detector labels to COCO ids")
    return entries


def xywh_to_xyxy(boxes_xywh: np.ndarray) -> np.ndarray:
    """COCO [x, y, w, h] boxes (N, 4) -> float32 [x0, y0, x1, y1] (N, 4), a new array."""
    boxes = np.asarray(boxes_xywh, dtype=np.float32).reshape(-1, 4).copy()
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def _group_prompts(image_ids: np.ndarray, boxes_xywh: np.ndarray, scores: np.ndarray,
                   category_ids: np.ndarray) -> _Prompts:
    """Sort prompts by image id (stably) and index each image's rows; boxes become xyxy."""
    order = np.argsort(image_ids, kind="stable")
    ids, boxes = image_ids[order], xywh_to_xyxy(boxes_xywh[order])
    unique, starts, counts = np.unique(ids, return_index=True, return_counts=True)
    spans = {int(i): (int(s), int(s + c)) for i, s, c in zip(unique, starts, counts)}
    return _Prompts(boxes, scores[order].astype(np.float32), category_ids[order].astype(np.int64), spans)


def clip_boxes_xywh(boxes: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, int]:
    """[x, y, w, h] boxes (N, 4) clipped to their images (heights, widths: (N,)); returns the clipped boxes and
    how many changed. A box left with no area inside its image keeps a 1-pixel extent at the border."""
    x0 = np.clip(boxes[:, 0], 0, widths - 1)
    y0 = np.clip(boxes[:, 1], 0, heights - 1)
    x1 = np.clip(boxes[:, 0] + boxes[:, 2], x0 + 1, widths)
    y1 = np.clip(boxes[:, 1] + boxes[:, 3], y0 + 1, heights)
    clipped = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)
    return clipped, int((np.abs(clipped - boxes) > 1e-6).any(axis=1).sum())


def _detector_prompts(prompts_file: Path, coco: COCO) -> _Prompts:
    entries = _validate_prompts(_read_json(prompts_file, "prompts", "data.prompts"), prompts_file, coco)
    sizes = np.array([[coco.imgs[e["image_id"]]["height"], coco.imgs[e["image_id"]]["width"]] for e in entries],
                     dtype=np.float64).reshape(-1, 2)
    boxes, changed = clip_boxes_xywh(np.array([e["bbox"] for e in entries], dtype=np.float64).reshape(-1, 4),
                                     sizes[:, 0], sizes[:, 1])
    if changed:
        logger.warning("prompts file %s: %d of %d boxes reach outside their image; clipped to it", prompts_file,
                       changed, len(entries))
    return _group_prompts(np.array([e["image_id"] for e in entries], dtype=np.int64), boxes,
                          np.array([e["score"] for e in entries], dtype=np.float64),
                          np.array([e["category_id"] for e in entries], dtype=np.int64))


def _gt_box_prompts(coco: COCO) -> _Prompts:
    anns = [a for a in coco.dataset["annotations"] if not a.get("iscrowd", 0)]
    return _group_prompts(np.array([a["image_id"] for a in anns], dtype=np.int64),
                          np.array([a["bbox"] for a in anns], dtype=np.float64),
                          np.ones(len(anns)), np.array([a["category_id"] for a in anns], dtype=np.int64))


def _select_image_ids(coco: COCO, image_ids: Sequence[int] | None, annotations_file: Path) -> list[int]:
    if image_ids is None:
        return sorted(coco.imgs)
    chosen = list(dict.fromkeys(int(i) for i in image_ids))
    unknown = [i for i in chosen if i not in coco.imgs]
    if unknown:
        raise DatasetError(f"image_ids {unknown[:5]} ({len(unknown)} in all) are not in {annotations_file}")
    return chosen


def _check_image_files(images_dir: Path, coco: COCO, image_ids: list[int]) -> None:
    """Every image file exists, is an image (by its content, whatever its extension) of a supported mode,
    and has the size its 'images' entry says: read from the file headers, before any heavy work."""
    missing = [images_dir / coco.imgs[i]["file_name"] for i in image_ids
               if not (images_dir / coco.imgs[i]["file_name"]).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(image_ids)} image file(s) missing, first: {missing[0]} "
                           "(set data.images to the folder holding the annotated images)")
    for image_id in image_ids:
        info = coco.imgs[image_id]
        path = images_dir / info["file_name"]
        try:
            with Image.open(path) as img:
                size, mode = img.size, img.mode
        except OSError as err:  # PIL's UnidentifiedImageError and truncated headers
            raise DatasetError(f"image {path} cannot be read ({err}); replace the file") from err
        if size != (info["width"], info["height"]):
            raise DatasetError(f"image {path} is {size[0]}x{size[1]} (WxH) but the annotations say "
                               f"{info['width']}x{info['height']}; fix the image file or its 'images' entry")
        if mode not in SUPPORTED_MODES:
            raise DatasetError(f"image {path} has PIL mode '{mode}', which carsam does not read (supported: "
                               f"{', '.join(SUPPORTED_MODES)}); convert it to 8-bit RGB")


def to_rgb8(img: Image.Image) -> np.ndarray:
    """An opened image as (H, W, 3) uint8 RGB. 16-bit grayscale is scaled to 8 bits (value // 257, so 65535
    -> 255), not clipped (PIL's `convert` would make it nearly all white); other modes go through
    `convert("RGB")`."""
    if img.mode in SIXTEEN_BIT_MODES:
        gray = (np.asarray(img, dtype=np.uint16) // 257).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


class CocoBoxPrompts:
    """A COCO-format image set whose samples carry box prompts from a detector file or the GT boxes.

    Indexing gives `ImageSample`s in `image_ids` order; `.coco` is the ground truth for COCOeval.
    `check_files=False` defers the check that every image file exists to `subset` (which checks
    the images it keeps), so a 32-image calibration subset of train2017 needs only those 32 files.
    """

    def __init__(self, images_dir: str | Path, annotations_file: str | Path, prompts_file: str | Path | None,
                 prompt_source: str = "detector", image_ids: Sequence[int] | None = None,
                 check_files: bool = True) -> None:
        if prompt_source not in PROMPT_SOURCES:
            raise DatasetError(f"prompt_source must be one of {PROMPT_SOURCES}, got '{prompt_source}'")
        if prompt_source == "detector" and prompts_file is None:
            raise DatasetError("prompt_source 'detector' needs a prompts file (set data.prompts to a "
                               "detection-results JSON, or use prompt_source 'gt_boxes')")
        self.images_dir, self.annotations_file = Path(images_dir), Path(annotations_file)
        self.prompts_file = Path(prompts_file) if prompts_file is not None and prompt_source == "detector" else None
        self.prompt_source = prompt_source
        self.coco = _load_coco(self.annotations_file)
        self._image_ids = _select_image_ids(self.coco, image_ids, self.annotations_file)
        if not self._image_ids:
            raise DatasetError(f"no images selected from {self.annotations_file}; the set would be empty")
        if prompt_source == "detector":
            assert prompts_file is not None  # a detector source without a prompts file raised above
            self._prompts = _detector_prompts(Path(prompts_file), self.coco)
        else:
            if prompts_file is not None:
                logger.info("prompt_source 'gt_boxes': ignoring prompts file %s", prompts_file)
            self._prompts = _gt_box_prompts(self.coco)
        if check_files:
            _check_image_files(self.images_dir, self.coco, self._image_ids)
        logger.info("loaded %d images (%s prompts) from %s", len(self), prompt_source, self.annotations_file)

    @property
    def image_ids(self) -> list[int]:
        """The image ids of this set, in sample order."""
        return list(self._image_ids)

    @property
    def num_prompts(self) -> int:
        """Total number of prompt boxes over this set's images."""
        return sum(self._span(i)[1] - self._span(i)[0] for i in self._image_ids)

    def __len__(self) -> int:
        return len(self._image_ids)

    def __getitem__(self, index: int) -> ImageSample:
        return self.get(self._image_ids[index])

    def __iter__(self) -> Iterator[ImageSample]:
        return (self.get(i) for i in self._image_ids)

    def subset(self, n: int, seed: int, require_prompts: bool = False) -> CocoBoxPrompts:
        """A set of `n` image ids drawn without replacement (deterministic in `seed`), sorted by id;
        with `require_prompts`, only from images that have at least one prompt. Checks their files."""
        pool = [i for i in self._image_ids if not require_prompts or self._span(i)[1] > self._span(i)[0]]
        if not 1 <= n <= len(pool):
            what = "images with prompts" if require_prompts else "images"
            if not pool:
                raise DatasetError(f"{self.annotations_file} has no {what}: the set is empty")
            raise DatasetError(f"subset size must be in [1, {len(pool)}] ({len(pool)} {what} in "
                               f"{self.annotations_file}), got {n}")
        chosen = np.random.default_rng(seed).choice(np.array(pool), size=n, replace=False)
        other = copy.copy(self)  # shares the read-only COCO index and prompts
        other._image_ids = sorted(int(i) for i in chosen)
        _check_image_files(other.images_dir, other.coco, other._image_ids)
        return other

    @property
    def num_gt_instances(self) -> int:
        """Non-crowd GT annotations over this set's images."""
        return sum(1 for i in self._image_ids for a in self.coco.imgToAnns.get(i, []) if not a.get("iscrowd", 0))

    def fingerprint(self, list_ids: bool = False) -> dict[str, object]:
        """What a record says about this set: the annotations and prompts files with their SHA-256, the images
        folder with one SHA-256 over the set's image files (each file's hash, in image-id order), the prompt
        source, the image count and, with `list_ids`, the image ids (a calibration subset's)."""
        digest = hashlib.sha256()
        for image_id in self._image_ids:
            file_name = self.coco.imgs[image_id]["file_name"]
            digest.update(f"{file_name}:{memoised_file_sha256(self.images_dir / file_name)}\n".encode())
        description: dict[str, object] = {
            "annotations": str(self.annotations_file), "annotations_sha256": memoised_file_sha256(self.annotations_file),
            "prompts": str(self.prompts_file) if self.prompts_file else None,
            "prompts_sha256": memoised_file_sha256(self.prompts_file) if self.prompts_file else None,
            "prompt_source": self.prompt_source, "images": str(self.images_dir), "images_sha256": digest.hexdigest(),
            "num_images": len(self)}
        if list_ids:
            description["image_ids"] = list(self._image_ids)
        return description

    def image_size(self, image_id: int) -> tuple[int, int]:
        """(H, W) of an image, as the annotations give it."""
        info = self.coco.imgs[image_id]
        return int(info["height"]), int(info["width"])

    def load_image(self, image_id: int) -> np.ndarray:
        """The image as (H, W, 3) uint8 RGB (grayscale, palette and RGBA are converted)."""
        path = self.images_dir / self.coco.imgs[image_id]["file_name"]
        try:
            with Image.open(path) as img:
                pixels = to_rgb8(img)
        except OSError as err:  # includes PIL's UnidentifiedImageError and truncated files
            raise DatasetError(f"image {path} cannot be read ({err}); replace the file") from err
        height, width = self.image_size(image_id)
        if pixels.shape[:2] != (height, width):
            raise DatasetError(f"image {path} is {pixels.shape[1]}x{pixels.shape[0]} (WxH) but the annotations "
                               f"say {width}x{height}; fix the image file or its 'images' entry")
        return pixels

    def prompts(self, image_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The image's prompts: boxes (N, 4) float32 xyxy, scores (N,) float32, category ids (N,) int64."""
        start, stop = self._span(image_id)
        p = self._prompts
        return p.boxes[start:stop].copy(), p.scores[start:stop].copy(), p.category_ids[start:stop].copy()

    def ground_truth(self, image_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Non-crowd GT: boxes (M, 4) float32 xyxy, masks (M, H, W) bool (decoded now), category ids (M,)."""
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = xywh_to_xyxy(np.array([a["bbox"] for a in anns], dtype=np.float32))
        if anns:  # like COCO.annToMask, but one decode call for all instances
            masks = mask_utils.decode([self.coco.annToRLE(a) for a in anns]).transpose(2, 0, 1).astype(bool)
        else:
            masks = np.zeros((0, *self.image_size(image_id)), dtype=bool)
        return boxes, masks, np.array([a["category_id"] for a in anns], dtype=np.int64)

    def get(self, image_id: int) -> ImageSample:
        """The full sample of one image id (reads the image and decodes its GT masks)."""
        boxes, scores, category_ids = self.prompts(image_id)
        gt_boxes, gt_masks, gt_category_ids = self.ground_truth(image_id)
        return ImageSample(image_id, self.load_image(image_id), boxes, scores, category_ids,
                           gt_boxes, gt_masks, gt_category_ids)

    def _span(self, image_id: int) -> tuple[int, int]:
        return self._prompts.spans.get(image_id, (0, 0))

    def __repr__(self) -> str:
        return (f"CocoBoxPrompts({len(self)} images, {self.num_prompts} {self.prompt_source} prompts, "
                f"annotations={self.annotations_file})")

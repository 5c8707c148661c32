"""A deterministic synthetic COCO-format instance-segmentation dataset (the testbed's data).

Each image has a textured background and 1-6 textured shape instances drawn in depth order, so
later shapes occlude earlier ones; each instance's mask is its *visible* region. A split is written
as PNG images plus `instances_<split>.json` (RLE masks), and, for the calibration and validation
splits, a detector-style prompts file `prompts_<split>.json` in COCO detection-results format
(`image_id, category_id, bbox, score`) with jittered boxes, a few misses and false positives.

Everything is a pure function of `(seed, split)`: the same arguments give the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from carsam.files import write_text_atomic

logger = logging.getLogger(__name__)

SPLITS = ("train", "calib", "val")


@dataclasses.dataclass(frozen=True)
class Family:
    """A family of synthetic datasets: its shape categories and their size (a fraction of the image's short
    side). `SyntheticSpec.for_family` adds the family's image sizes and instance counts."""

    categories: tuple[str, ...]
    size_range: tuple[float, float]


# `shapes` is the testbed's family (v1 and v2 were trained on it); `glyphs` is a second family with other
# shapes, larger images and more instances per image, for checking that a conclusion is not tuned to one
# dataset.
FAMILIES = {
    "shapes": Family(("disc", "square", "triangle", "ellipse", "ring", "cross"), (0.12, 0.32)),
    "glyphs": Family(("star", "hexagon", "crescent", "capsule", "chevron", "ell"), (0.10, 0.30)),
}
CATEGORIES = FAMILIES["shapes"].categories
# A family's image sizes and instance counts: (min_side, max_side, max_instances).
_FAMILY_IMAGES = {"shapes": (96, 160, 6), "glyphs": (112, 176, 8)}


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Sizes are in pixels; counts per split. `family` names the shape family
    (`FAMILIES`); `for_family` gives a family's own image sizes and instance counts."""

    seed: int = 0
    family: str = "shapes"
    num_images: tuple[tuple[str, int], ...] = (("train", 4000), ("calib", 64), ("val", 250))
    min_side: int = 96
    max_side: int = 160
    max_instances: int = 6
    min_visible_fraction: float = 0.35
    min_area: int = 60
    miss_rate: float = 0.08
    false_positive_rate: float = 0.4
    box_jitter: float = 0.06

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown synthetic family '{self.family}'; choose one of {sorted(FAMILIES)}")

    @classmethod
    def for_family(cls, family: str, seed: int) -> SyntheticSpec:
        """The spec of `family`'s datasets at `seed`: its image sizes and instance counts, the rest default."""
        spec = cls(seed=seed, family=family)  # refuses an unknown family
        min_side, max_side, max_instances = _FAMILY_IMAGES[family]
        return dataclasses.replace(spec, min_side=min_side, max_side=max_side, max_instances=max_instances)

    @property
    def categories(self) -> tuple[str, ...]:
        return FAMILIES[self.family].categories

    def count(self, split: str) -> int:
        return dict(self.num_images)[split]


@dataclasses.dataclass
class Instance:
    """One drawn instance: its category index and visible boolean mask (H, W)."""

    category: int
    mask: np.ndarray


def split_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """An independent generator per (seed, split, image index), stable across numpy versions."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1] of shape (h, w): a coarse random grid, bilinearly upsampled."""
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    # Pillow defines its module-level filter constants with setattr, so its inline types lack them.
    img = Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR)  # type: ignore[attr-defined]
    return np.asarray(img, dtype=np.float32)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A colour texture (h, w, 3) in [0, 255]: base colour modulated by stripes or blotches."""
    base = rng.uniform(30, 225, size=3).astype(np.float32)
    second = rng.uniform(30, 225, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:  # stripes at a random angle and period
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 14)
        t = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    elif kind == 1:  # blotches
        t = _smooth_noise(rng, h, w, int(rng.integers(3, 8)))
    else:  # nearly flat with fine grain
        t = 0.15 * rng.random((h, w)).astype(np.float32)
    img = base[None, None] * (1 - t[..., None]) + second[None, None] * t[..., None]
    return img + rng.normal(0, 6, size=(h, w, 3)).astype(np.float32)


def _triangle(u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    """An equilateral triangle: three half-planes."""
    inside = np.ones(u.shape, dtype=bool)
    for k in range(3):
        a = 2 * np.pi * k / 3
        inside &= u * np.cos(a) + v * np.sin(a) <= 0.6 * size
    return inside


def _hexagon(u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    """A regular hexagon: three slabs at 60 degrees."""
    inside = np.ones(u.shape, dtype=bool)
    for k in range(3):
        a = np.pi * k / 3
        inside &= np.abs(u * np.cos(a) + v * np.sin(a)) <= 0.8 * size
    return inside


def _capsule(u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    """A stadium: points within 0.35 * size of a segment of length 1.3 * size."""
    along = np.clip(u, -0.65 * size, 0.65 * size)
    return (u - along) ** 2 + v**2 <= (0.35 * size) ** 2


def _ell(u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    """An L: a horizontal and a vertical bar sharing a corner."""
    bar = (np.abs(u) <= 0.8 * size) & (v >= 0.35 * size) & (v <= 0.8 * size)
    post = (u >= -0.8 * size) & (u <= -0.35 * size) & (np.abs(v) <= 0.8 * size)
    return bar | post


# Each shape is a boolean function of the pose's rotated coordinates (u, v) (pixels from the centre) and
# a size in pixels. A family draws its categories from this table.
_SHAPES = {
    "disc": lambda u, v, s: u**2 + v**2 <= s**2,
    "square": lambda u, v, s: (np.abs(u) <= s * 0.85) & (np.abs(v) <= s * 0.85),
    "triangle": _triangle,
    "ellipse": lambda u, v, s: (u / s) ** 2 + (v / (0.45 * s)) ** 2 <= 1,
    "ring": lambda u, v, s: (u**2 + v**2 <= s**2) & (u**2 + v**2 >= (0.55 * s) ** 2),
    "cross": lambda u, v, s: (((np.abs(u) <= s) & (np.abs(v) <= 0.3 * s))
                              | ((np.abs(v) <= s) & (np.abs(u) <= 0.3 * s))),
    "star": lambda u, v, s: np.hypot(u, v) <= s * (0.6 + 0.4 * np.cos(5 * np.arctan2(v, u))),
    "hexagon": _hexagon,
    "crescent": lambda u, v, s: (u**2 + v**2 <= s**2) & ((u - 0.45 * s) ** 2 + v**2 > (0.8 * s) ** 2),
    "capsule": _capsule,
    "chevron": lambda u, v, s: ((u - 0.9 * np.abs(v) >= -0.35 * s) & (u - 0.9 * np.abs(v) <= 0.1 * s)
                                & (np.abs(v) <= 0.9 * s)),
    "ell": _ell,
}


def _shape_mask(rng: np.random.Generator, name: str, family: Family, h: int, w: int) -> np.ndarray:
    """A boolean (h, w) mask of one shape `name` at a random pose and a size drawn from `family`."""
    size = rng.uniform(*family.size_range) * min(h, w)
    cy, cx = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    return _SHAPES[name](u, v, size)


def render_image(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[np.ndarray, list[Instance]]:
    """Render one image (H, W, 3) uint8 and its annotated instances (at least one).

    Shapes are painted back to front; each keeps the part that later shapes leave visible.
    Shapes left mostly hidden (visible share below `min_visible_fraction`, or under `min_area`
    pixels) stay in the image as unlabelled clutter.
    """
    h, w = (int(x) for x in rng.integers(spec.min_side, spec.max_side + 1, size=2))
    canvas = _texture(rng, h, w) * (0.7 + 0.6 * _smooth_noise(rng, h, w, 2)[..., None])
    drawn: list[tuple[int, int, np.ndarray]] = []  # (category, drawn area, visible mask)
    for _ in range(int(rng.integers(1, spec.max_instances + 1))):
        category = int(rng.integers(len(spec.categories)))
        full = _shape_mask(rng, spec.categories[category], FAMILIES[spec.family], h, w)
        if full.sum() < spec.min_area:
            continue
        canvas[full] = _texture(rng, h, w)[full]
        drawn = [(c, a, m & ~full) for c, a, m in drawn] + [(category, int(full.sum()), full)]
    if not drawn:  # guarantee one instance: a disc in the centre
        full = _centre_disc(h, w)
        canvas[full] = _texture(rng, h, w)[full]
        drawn = [(0, int(full.sum()), full)]
    instances = [Instance(c, m) for c, a, m in drawn
                 if m.sum() >= spec.min_area and m.sum() >= spec.min_visible_fraction * a]
    return np.clip(canvas, 0, 255).astype(np.uint8), instances


def _centre_disc(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (0.2 * min(h, w)) ** 2


def bbox_xywh(mask: np.ndarray) -> list[float]:
    """Tight COCO box [x, y, w, h] of a boolean (H, W) mask."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE of a boolean (H, W) mask, with `counts` as str (JSON-serialisable)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _box_iou_xywh(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def jitter_box(rng: np.random.Generator, box: list[float], rel: float, h: int, w: int) -> list[float]:
    """Move each edge of an [x, y, w, h] box by N(0, rel * side) pixels, kept inside the image."""
    x0, y0, bw, bh = box
    dx0, dx1 = rng.normal(0, rel * bw, size=2)
    dy0, dy1 = rng.normal(0, rel * bh, size=2)
    nx0, ny0 = np.clip(x0 + dx0, 0, w - 2), np.clip(y0 + dy0, 0, h - 2)
    nx1, ny1 = np.clip(x0 + bw + dx1, nx0 + 2, w), np.clip(y0 + bh + dy1, ny0 + 2, h)
    return [round(float(nx0), 2), round(float(ny0), 2), round(float(nx1 - nx0), 2), round(float(ny1 - ny0), 2)]


def detector_prompts(rng: np.random.Generator, image_id: int, gt: list[dict], h: int, w: int,
                     spec: SyntheticSpec) -> list[dict]:
    """Simulated detector output for one image: jittered true boxes (score tracks box quality,
    category right 95% of the time), `miss_rate` misses, Poisson(`false_positive_rate`) false alarms."""
    dets = []
    for ann in gt:
        if rng.random() < spec.miss_rate:
            continue
        box = jitter_box(rng, ann["bbox"], spec.box_jitter, h, w)
        score = float(np.clip(0.25 + 0.7 * _box_iou_xywh(box, ann["bbox"]) + rng.normal(0, 0.08), 0.05, 0.99))
        cat = ann["category_id"] if rng.random() < 0.95 else int(rng.integers(1, len(spec.categories) + 1))
        dets.append({"image_id": image_id, "category_id": int(cat), "bbox": box, "score": round(score, 4)})
    for _ in range(int(rng.poisson(spec.false_positive_rate))):
        bw, bh = rng.uniform(0.1, 0.4, size=2) * np.array([w, h])
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        dets.append({"image_id": image_id, "category_id": int(rng.integers(1, len(spec.categories) + 1)),
                     "bbox": [round(float(v), 2) for v in (x0, y0, bw, bh)],
                     "score": round(float(rng.uniform(0.05, 0.5)), 4)})
    return dets


def _write_json(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj))


def dataset_dir(parent: str | Path, seed: int, family: str = "shapes") -> Path:
    """The folder of the synthetic dataset of `seed` under `parent`: `parent/testbed-seed<seed>` for the
    testbed's own family, `parent/testbed-<family>-seed<seed>` for another."""
    return Path(parent) / (f"testbed-seed{seed}" if family == "shapes" else f"testbed-{family}-seed{seed}")


def generate_split(spec: SyntheticSpec, split: str, root: str | Path) -> dict[str, Path]:
    """Write `root/images/<split>/*.png`, `root/instances_<split>.json` and, except for the train
    split, `root/prompts_<split>.json`. Returns the written paths by kind."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    root = Path(root)
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    annotations: list[dict]
    images, annotations, prompts = [], [], []
    for index in range(spec.count(split)):
        rng = split_rng(spec.seed, split, index)
        image_id = index + 1
        pixels, instances = render_image(rng, spec)
        h, w = pixels.shape[:2]
        file_name = f"{split}_{image_id:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name, compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        gt = [{"id": len(annotations) + k + 1, "image_id": image_id, "category_id": inst.category + 1,
               "segmentation": encode_rle(inst.mask), "area": float(inst.mask.sum()),
               "bbox": bbox_xywh(inst.mask), "iscrowd": 0} for k, inst in enumerate(instances)]
        annotations.extend(gt)
        prompts.extend(detector_prompts(rng, image_id, gt, h, w, spec))
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(spec.categories)]
    info = {"description": "carsam synthetic", "seed": spec.seed}
    if spec.family != "shapes":  # the testbed family's files keep the bytes they had before families existed
        info["family"] = spec.family
    paths = {"images": image_dir, "annotations": root / f"instances_{split}.json"}
    _write_json(paths["annotations"], {"images": images, "annotations": annotations, "categories": categories,
                                       "info": info})
    if split != "train":
        paths["prompts"] = root / f"prompts_{split}.json"
        _write_json(paths["prompts"], prompts)
    logger.info("wrote %s split: %d images, %d instances", split, len(images), len(annotations))
    return paths


def generate_dataset(spec: SyntheticSpec, root: str | Path, splits: tuple[str, ...] = SPLITS) -> None:
    """Generate every split in `splits` under `root`."""
    for split in splits:
        generate_split(spec, split, root)


def ensure_dataset(spec: SyntheticSpec, root: str | Path, splits: tuple[str, ...] = ("calib", "val")) -> Path:
    """Generate the missing `splits` of `spec` under `root` once; later calls reuse them.

    A split counts as present when its marker file records the same spec. A lock file makes
    concurrent callers (sweep workers) wait for one another instead of writing the same files twice.
    """
    import fcntl

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    wanted = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for split in splits:
            marker = root / f".complete-{split}.json"
            if marker.is_file() and marker.read_text() == wanted:
                continue
            generate_split(spec, split, root)
            write_text_atomic(marker, wanted)
    return root

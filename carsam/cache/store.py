"""The base of the on-disk stage caches: entry files, canonical keys, and the counts a run records.

An `EntryStore` keeps entries of one kind at `<dir>/<kind>/<key[:2]>/<key>.pt`: `torch.save` payloads read
back with `weights_only=True` on CPU, written atomically (`carsam.files.replace_atomic`), so concurrent
workers never read a torn file and two writers of one key each leave a complete file. A file that cannot
be read, or does not hold what its name says, is a miss (a warning), never a crash. Keys are the SHA-256
of a canonical JSON of exactly what an entry depends on (`canonical_key`); `numerics_fields` is the part
every stage shares (device kind, matmul precision, library versions).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from carsam.files import replace_atomic

if TYPE_CHECKING:
    from carsam.data.coco import CocoBoxPrompts

logger = logging.getLogger(__name__)

T = TypeVar("T")
VERSIONED = ("torch", "pillow", "segment-anything")  # the libraries whose code computes an entry's numbers


def canonical_key(fields: Mapping[str, Any]) -> str:
    """Hex SHA-256 of `fields` as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def image_file(dataset: CocoBoxPrompts, image_id: int) -> Path:
    """The file that `dataset.load_image(image_id)` reads."""
    return dataset.images_dir / dataset.coco.imgs[image_id]["file_name"]


@functools.lru_cache(maxsize=1)
def numerics_library_versions() -> dict[str, str]:
    """Versions of the libraries whose code computes an embedding (resize, kernels)."""
    found = {}
    for dist in VERSIONED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def numerics_fields(device: torch.device) -> dict[str, Any]:
    """What, besides the weights, changes the encoder's numbers: device kind, matmul precision, versions."""
    fields: dict[str, Any] = {"device": device.type, "matmul_precision": torch.get_float32_matmul_precision(),
                              "versions": numerics_library_versions()}
    if device.type == "cuda":
        fields.update(gpu=torch.cuda.get_device_name(device), tf32=[torch.backends.cuda.matmul.allow_tf32,
                                                                    torch.backends.cudnn.allow_tf32])
    return fields


@dataclasses.dataclass
class CacheStats:
    """Counts of one store: served from disk, computed and written, encoded without the cache (encoder not
    FP, or hooked, or its image file unreadable), and unreadable entries (each also counted as a miss);
    seconds spent serving hits (key, read) and misses (key, encode, write); quantized embeddings served
    again from memory within a run (`EmbeddingStore.keep_quantized`). Wall clock: on CUDA the encoder's
    asynchronous work may be counted later."""

    hits: int = 0
    misses: int = 0
    bypassed: int = 0
    corrupt: int = 0
    hit_seconds: float = 0.0
    miss_seconds: float = 0.0
    reused: int = 0

    def record(self) -> dict[str, Any]:
        """The counts as a run record keeps them (seconds rounded to ms)."""
        counts = dataclasses.asdict(self)
        counts.update(hit_seconds=round(self.hit_seconds, 3), miss_seconds=round(self.miss_seconds, 3))
        return counts


class EntryStore:
    """Entries of one `kind` on disk, `<directory>/<kind>/<key[:2]>/<key>.pt`, shared by runs and workers:
    `torch.save` payloads read back with `weights_only=True` on CPU, written atomically (serialised first,
    then one write and a rename), so a concurrent reader sees the old file or the new one, never a torn one.

    directory: the cache root (`cache.dir`); model: `{"type", "sha256"}` of the checkpoint the runs build.
    `unreadable`: the warning logged (with path, error type, error) when an entry cannot be used.
    """

    kind = ""
    unreadable = "cache: unreadable entry %s (%s: %s)"

    def __init__(self, directory: str | Path, model: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.model = {"type": str(model["type"]), "sha256": str(model["sha256"])}

    def path(self, key: str) -> Path:
        """Where the entry of `key` lives."""
        return self.directory / self.kind / key[:2] / f"{key}.pt"

    def read(self, key: str, parse: Callable[[Any], T], stats: CacheStats) -> T | None:
        """`parse` of the stored payload of `key`, or None when absent or unusable (a warning, and
        `stats.corrupt` counted): any unreadable file is a miss, never a crash."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return parse(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:  # noqa: BLE001 - see the docstring
            logger.warning(self.unreadable, path, type(err).__name__, err)
            stats.corrupt += 1
            return None

    def write(self, key: str, payload: Any) -> None:
        """Store `payload` as the entry of `key`, atomically."""
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        replace_atomic(self.path(key), lambda tmp: tmp.write_bytes(buffer.getvalue()))


__all__ = ["CacheStats", "EntryStore", "canonical_key", "image_file", "numerics_fields", "numerics_library_versions"]

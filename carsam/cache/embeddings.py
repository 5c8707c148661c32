"""On-disk FP image embeddings (`EmbeddingStore`), shared by the runs, trials and workers of a study.

An entry is the *FP* image encoder's output for one dataset image (`ImageEmbedding`: features
`(1, 256, g, g)` plus the resized input size and the original size; 4 MiB on real SAM, 256 x 64 x 64
float32). The pipeline builds one store per run (`RunContext.embeddings`, None with `cache.enabled=false`)
and hands it to every `SamBoxPredictor(..., source=...)`, whose `embed_image` asks it (`embed`). It is read
or written only while the encoder computes the FP encoder (`encoder_is_fp`: every encoder quantizer in FP
mode, or none, and every Parameter a method changed in place holding its original value) and nothing
hooks it (`encoder_is_hooked`: the block-I/O capture of encoder units, MAC on encoder attentions, the
encoder-scope diagnostics, a global module hook); otherwise the pass encodes and counts as `bypassed`.
Quantized embeddings are never stored; `keep_quantized` memoises them in memory (evaluation -> diagnostics).

The key is the SHA-256 of exactly what an FP embedding depends on (`embedding_key_fields`: format, model
type and checkpoint hash, the encoder's architecture and preprocessing, device and numerics, the image
file's bytes), so decoder knobs, bits, methods and seeds share one entry per image. Entries live at
`<dir>/embeddings/<key[:2]>/<key>.pt` and are written atomically (`carsam.cache.store.EntryStore`); an
unreadable or mismatched entry is a miss (a warning, then recomputed and rewritten). The full key
table and when each pass reads the store: docs/caching.md.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from carsam.cache.store import CacheStats, EntryStore, canonical_key, image_file, numerics_fields
from carsam.eval.inference import ImageEmbedding, SamBoxPredictor
from carsam.files import memoised_file_sha256
from carsam.models.sam2_image import Sam2ImageModel
from carsam.quant.fp_reference import SUFFIX, fp_references
from carsam.quant.quantizers import QuantMode, iter_quantizers

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from carsam.data.coco import CocoBoxPrompts

logger = logging.getLogger(__name__)

T = TypeVar("T")
CACHE_FORMAT = 2  # bump when what is stored, or how an embedding is computed, changes (2: SAM2's high_res)
EMBEDDINGS = "embeddings"


def encoder_fields(sam: Sam) -> dict[str, Any]:
    """The encoder's architecture and preprocessing as built (what a checkpoint hash alone does not pin)."""
    if isinstance(sam, Sam2ImageModel):
        return sam.encoder_fields()
    encoder = sam.image_encoder
    param = next(encoder.parameters())
    return {"img_size": int(encoder.img_size), "patch": list(encoder.patch_embed.proj.kernel_size),
            "blocks": [[int(b.attn.num_heads), int(b.window_size)] for b in encoder.blocks],
            "pixel_mean": sam.pixel_mean.flatten().tolist(), "pixel_std": sam.pixel_std.flatten().tolist(),
            "dtype": str(param.dtype)}


def embedding_key_fields(model: Mapping[str, Any], sam: nn.Module, device: torch.device,
                         image_sha256: str) -> dict[str, Any]:
    """Exactly the fields an FP image embedding depends on (module docstring)."""
    return {"format": CACHE_FORMAT, "kind": EMBEDDINGS, "model": {"type": model["type"], "sha256": model["sha256"]},
            "encoder": encoder_fields(sam), "numerics": numerics_fields(device), "image_sha256": image_sha256}


def encoder_is_hooked(sam: Sam) -> bool:
    """Whether a forward (pre-)hook would see the encoder run: one on `sam.image_encoder` or a module inside
    it, or a global module hook. A cached embedding would skip the hooks, so such passes encode."""
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in sam.image_encoder.modules())


def encoder_is_fp(sam: Sam) -> bool:
    """Whether `sam.image_encoder` computes the FP encoder now: every quantizer in it in FP mode (or none
    there), and every Parameter with an FP reference (`carsam.quant.fp_reference`) holding that reference."""
    encoder = sam.image_encoder
    if any(q.mode is not QuantMode.FP for _, q in iter_quantizers(encoder)):
        return False
    return all(getattr(m, n).data_ptr() == getattr(m, n + SUFFIX).data_ptr() for m, n in fp_references(encoder))


def encoder_snapshot(sam: Sam) -> tuple[Any, ...]:
    """A cheap fingerprint of the encoder's current computation: each quantizer's identity, mode and QDrop
    probability, and each Parameter's and buffer's storage and version counter. Any in-place change,
    reassignment or mode switch changes it."""
    encoder = sam.image_encoder
    quantizers = tuple((id(q), q.mode, q.quant_prob) for _, q in iter_quantizers(encoder))
    tensors = tuple((name, t.data_ptr(), t._version) for name, t in
                    (*encoder.named_parameters(), *encoder.named_buffers()))
    return quantizers, tensors


def _payload(key: str, embedding: ImageEmbedding) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "key": key, "features": embedding.features.detach().to("cpu", copy=True),
            "input_size": list(embedding.input_size), "original_size": list(embedding.original_size),
            "high_res": [t.detach().to("cpu", copy=True) for t in embedding.high_res]}


def _embedding(payload: Any, key: str) -> ImageEmbedding:
    """The embedding in a loaded payload; ValueError unless it is exactly what `_payload` writes for `key`."""
    if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT or payload.get("key") != key:
        raise ValueError("not a cache entry of this key and format")
    features, sizes = payload.get("features"), (payload.get("input_size"), payload.get("original_size"))
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        raise ValueError("features are not a (1, C, g, g) tensor")
    if not all(isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s) for s in sizes):
        raise ValueError("sizes are not pairs of ints")
    high_res = payload.get("high_res")
    if not isinstance(high_res, list) or not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in high_res):
        raise ValueError("high_res is not a list of (1, C, h, w) tensors")
    return ImageEmbedding(features, tuple(sizes[0]), tuple(sizes[1]), tuple(high_res))  # type: ignore[arg-type]


class EmbeddingStore(EntryStore):
    """FP image embeddings on disk (module docstring); a `carsam.eval.inference.EmbeddingSource`.

    directory: the cache root (`cache.dir`, default `<runs_dir>/.cache`); model: `{"type", "sha256"}` of the
    checkpoint the runs build (`carsam.pipeline.model_description`).
    """

    kind = EMBEDDINGS
    unreadable = "embedding cache: unreadable entry %s (%s: %s); recomputing it"

    def __init__(self, directory: str | Path, model: Mapping[str, Any]) -> None:
        super().__init__(directory, model)
        self.stats = CacheStats()
        self._kept: dict[int, ImageEmbedding] = {}
        self._keep_ids: frozenset[int] = frozenset()
        self._kept_snapshot: tuple[Any, ...] | None = None
        self._kept_dataset: int | None = None

    @contextlib.contextmanager
    def keep_quantized(self, sam: nn.Module, dataset: CocoBoxPrompts, image_ids: Iterable[int]) -> Iterator[None]:
        """Inside the block, the embeddings of `dataset`'s `image_ids` computed by the *quantized* (non-FP,
        unhooked) encoder are kept in memory (CPU) and served again while the encoder's computation is
        unchanged (`encoder_snapshot`): the pipeline opens it around evaluation and diagnostics, whose
        quantized pass then reuses the evaluation's embeddings instead of encoding again. Dropped on exit."""
        self._keep_ids, self._kept_snapshot, self._kept = frozenset(image_ids), encoder_snapshot(sam), {}
        self._kept_dataset = id(dataset)
        try:
            yield
        finally:
            self._keep_ids, self._kept_snapshot, self._kept = frozenset(), None, {}

    def _reusable(self, predictor: SamBoxPredictor, dataset: CocoBoxPrompts, image_id: int) -> bool:
        return (image_id in self._keep_ids and id(dataset) == self._kept_dataset and
                not encoder_is_hooked(predictor.sam) and encoder_snapshot(predictor.sam) == self._kept_snapshot)

    def _encode_quantized(self, predictor: SamBoxPredictor, dataset: CocoBoxPrompts, image_id: int) -> ImageEmbedding:
        """A non-FP or hooked encoder's embedding: kept/reused under `keep_quantized`, else encoded."""
        if not self._reusable(predictor, dataset, image_id):
            self.stats.bypassed += 1
            return predictor.embed(dataset.load_image(image_id))  # a missing image raises its DatasetError here
        kept = self._kept.get(image_id)
        if kept is not None:
            self.stats.reused += 1
            return kept.to(predictor.device)
        self.stats.bypassed += 1
        embedding = predictor.embed(dataset.load_image(image_id))
        self._kept[image_id] = embedding.to("cpu")
        return embedding

    def key(self, sam: nn.Module, device: torch.device, image_path: str | Path) -> str:
        """The key of `image_path`'s FP embedding by `sam`'s encoder on `device`."""
        return canonical_key(embedding_key_fields(self.model, sam, device, memoised_file_sha256(image_path)))

    def load(self, key: str) -> ImageEmbedding | None:
        """The stored embedding of `key` (features on CPU), or None if absent or unreadable (a warning)."""
        return self.read(key, lambda payload: _embedding(payload, key), self.stats)

    def save(self, key: str, embedding: ImageEmbedding) -> None:
        """Write the entry of `key` atomically."""
        self.write(key, _payload(key, embedding))

    def _usable_key(self, predictor: SamBoxPredictor, dataset: CocoBoxPrompts, image_id: int) -> str | None:
        """The image's key, or None when the encoder is not FP, is hooked, or the file cannot be hashed."""
        if not encoder_is_fp(predictor.sam) or encoder_is_hooked(predictor.sam):
            return None
        try:
            return self.key(predictor.sam, predictor.device, image_file(dataset, image_id))
        except OSError:
            return None

    def embed(self, predictor: SamBoxPredictor, dataset: CocoBoxPrompts, image_id: int) -> ImageEmbedding:
        """The embedding of `dataset`'s image `image_id` by `predictor`: from disk when the encoder is FP and
        unhooked and the entry exists (features moved to the predictor's device), else encoded (and stored
        if FP and unhooked)."""
        start = time.perf_counter()
        key = self._usable_key(predictor, dataset, image_id)
        if key is None:
            return self._encode_quantized(predictor, dataset, image_id)
        cached = self.load(key)
        if cached is not None and cached.original_size == dataset.image_size(image_id):
            self.stats.hits += 1
            embedding = cached.to(predictor.device)
            self.stats.hit_seconds += time.perf_counter() - start
            return embedding
        embedding = predictor.embed(dataset.load_image(image_id))
        self.stats.misses += 1
        try:
            self.save(key, embedding)
        except OSError as err:  # a full or read-only disk slows the run down, it does not fail it
            logger.warning("embedding cache: cannot write %s (%s)", self.path(key), err)
        self.stats.miss_seconds += time.perf_counter() - start
        return embedding

    def summary(self) -> dict[str, Any]:
        """What the run record keeps: the counts and the folder."""
        return {"enabled": True, **self.stats.record(), "dir": str(self.directory)}


__all__ = ["CACHE_FORMAT", "EmbeddingStore", "embedding_key_fields", "encoder_fields", "encoder_is_fp",
           "encoder_is_hooked", "encoder_snapshot"]

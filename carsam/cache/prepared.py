"""On-disk prepared quantized models (`PreparedStore`): knob-free stages restored instead of recomputed.

Two stages go through `PreparedStore.prepare`: `ptq4sam` (`carsam.methods.ptq4sam.prepare_ptq4sam_`:
quantize, BIG, AGQ, calibrate every range; what PTQ4SAM and CAR-SAM runs do first) and `recon_encoder`
(the image-encoder units, `carsam.recon.driver.reconstruct_encoder_units_`). The pipeline builds one store
per run (`RunContext.prepared`); None computes every stage. An entry (`<dir>/prepared/<key[:2]>/<key>.pt`,
written atomically) holds the `state_dict` entries of the stage's `scope` that it created or changed (every
quantizer entry, and every Parameter new or written, `parameter_identity`), its `details`, and the global
RNG state after it, so a restored run is bit-identical to a computed one. Restoring runs the caller's
`rebuild(details)` (the module structure), loads the entries (checked), sets every quantizer QUANTIZED
and sets the RNG state.

The key is the SHA-256 of exactly what the stage depends on (`prepared_key_fields`: format, stage name
and config fields, model and FP structure, the calibration set in order, numerics, carsam's source files,
the RNG state on entry); `mac.*`, `jcar.*` and `recon.grouping` are in no key. An unreadable entry is a
miss (a warning; the stage runs and rewrites it); one that reads but does not fit the rebuilt model stops
the run with an error naming the file. A stage that cannot be keyed (no checkpoint file to hash, an
unhashable calibration image) runs as without a store (`bypassed`); one that leaves FP references
(`carsam.quant.fp_reference`, which a restore would lose) runs but is not stored. Full key table:
docs/caching.md.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import carsam
from carsam.cache.store import CacheStats, EntryStore, canonical_key, image_file, numerics_fields
from carsam.files import memoised_file_sha256
from carsam.quant.fp_reference import fp_references
from carsam.quant.quantizers import QuantMode, iter_quantizers
from carsam.quant.state import set_quant_mode

if TYPE_CHECKING:
    from carsam.data.coco import CocoBoxPrompts

logger = logging.getLogger(__name__)

PREPARED_FORMAT = 1  # bump when what is stored, or how it is restored, changes
PREPARED = "prepared"

@functools.lru_cache(maxsize=1)
def source_sha256() -> str:
    """SHA-256 over carsam's Python source files (relative path and bytes, sorted by path)."""
    root = Path(carsam.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def stage_library_versions() -> dict[str, str]:
    """Versions of the libraries that run a stage's loops besides torch (Lightning, numpy)."""
    found = {}
    for dist in ("lightning", "numpy"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def structure_sha256(model: nn.Module) -> str:
    """SHA-256 of `model`'s structure: each module's path and class, each state entry's name, shape, dtype."""
    digest = hashlib.sha256()
    for path, module in model.named_modules():
        digest.update(f"{path}:{type(module).__module__}.{type(module).__qualname__};".encode())
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()


def calibration_fields(calib: CocoBoxPrompts) -> list[dict[str, Any]]:
    """The calibration set as preparation sees it, in order: per image its file's SHA-256 and prompt boxes."""
    return [{"image_sha256": memoised_file_sha256(image_file(calib, image_id)),
             "boxes": calib.prompts(image_id)[0].tolist()} for image_id in calib.image_ids]


def rng_states(device: torch.device) -> list[torch.Tensor]:
    """The global torch RNG states a later random draw depends on: CPU, and the device's on CUDA."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def set_rng_states(states: list[torch.Tensor], device: torch.device) -> None:
    """Inverse of `rng_states`."""
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


def prepared_key_fields(model: Mapping[str, Any], sam: nn.Module, device: torch.device, stage: str,
                        stage_fields: Mapping[str, Any], calib: CocoBoxPrompts) -> dict[str, Any]:
    """Exactly the fields a prepared model depends on (module docstring); `sam` is the FP model."""
    rng = hashlib.sha256(b"".join(s.cpu().numpy().tobytes() for s in rng_states(device))).hexdigest()
    return {"format": PREPARED_FORMAT, "kind": PREPARED, "stage": stage, "config": dict(stage_fields),
            "model": {"type": model["type"], "sha256": model["sha256"], "structure": structure_sha256(sam)},
            "calibration": calibration_fields(calib), "numerics": numerics_fields(device),
            "libraries": stage_library_versions(), "code_sha256": source_sha256(), "rng_before": rng}


@dataclasses.dataclass
class PreparedEntry:
    """One stored preparation: the state entries it created or changed, its details, the RNG after it."""

    state: dict[str, Any]
    details: dict[str, Any]
    rng_after: list[torch.Tensor]


def _payload(key: str, entry: PreparedEntry) -> dict[str, Any]:
    return {"format": PREPARED_FORMAT, "key": key, "state": entry.state,
            "details": json.dumps(entry.details, allow_nan=True), "rng_after": entry.rng_after}


def _entry(payload: Any, key: str) -> PreparedEntry:
    """The entry in a loaded payload; ValueError unless it is what `_payload` writes for `key`."""
    if not isinstance(payload, dict) or payload.get("format") != PREPARED_FORMAT or payload.get("key") != key:
        raise ValueError("not a prepared-model entry of this key and format")
    state, details, rng = payload.get("state"), payload.get("details"), payload.get("rng_after")
    if not isinstance(state, dict) or not isinstance(details, str) or not isinstance(rng, list) or \
            not all(isinstance(s, torch.Tensor) for s in rng):
        raise ValueError("malformed state, details or RNG state")
    return PreparedEntry(state, json.loads(details), rng)


class PreparedStore(EntryStore):
    """Prepared quantized models on disk (module docstring).

    directory: the cache root (`cache.dir`); model: `{"type", "sha256"}` of the checkpoint the runs build.
    `stage_stats` counts per stage; `stats` is their sum.
    """

    kind = PREPARED
    unreadable = "prepared-model cache: unusable entry %s (%s: %s); preparing again"

    def __init__(self, directory: str | Path, model: Mapping[str, Any]) -> None:
        super().__init__(directory, model)
        self.stage_stats: dict[str, CacheStats] = {}

    @property
    def stats(self) -> CacheStats:
        """The counts summed over the stages."""
        total = CacheStats()
        for counts in self.stage_stats.values():
            for field in dataclasses.fields(CacheStats):
                setattr(total, field.name, getattr(total, field.name) + getattr(counts, field.name))
        return total

    def key(self, sam: nn.Module, stage: str, stage_fields: Mapping[str, Any], calib: CocoBoxPrompts) -> str | None:
        """The key of preparing the FP `sam` by `stage` on `calib` now; None when it cannot be keyed
        (no checkpoint file, an unreadable calibration image)."""
        if self.model["sha256"] == "missing":
            return None
        device = next(sam.parameters()).device
        try:
            return canonical_key(prepared_key_fields(self.model, sam, device, stage, stage_fields, calib))
        except OSError:
            return None

    def load(self, key: str, stats: CacheStats) -> PreparedEntry | None:
        """The stored entry of `key`, or None if absent or unreadable (a warning, counted in `stats`)."""
        return self.read(key, lambda payload: _entry(payload, key), stats)

    def prepare(self, sam: nn.Module, calib: CocoBoxPrompts, stage: str, stage_fields: Mapping[str, Any],
                compute: Callable[[], dict[str, Any]], rebuild: Callable[[dict[str, Any]], None],
                scope: nn.Module | None = None) -> tuple[dict[str, Any], bool]:
        """Run the stage `stage` on `sam` in place: restore the stored result when there is one, else
        `compute()` it (returning its details) and store it. `rebuild(details)` must recreate the module
        structure `compute` leaves (quantized twins, swapped quantizers). `scope` (default `sam`): the
        module whose quantizer entries (and Parameters changed in place) the stage writes.
        Returns the details and whether they were restored."""
        scope = sam if scope is None else scope
        start = time.perf_counter()
        stats = self.stage_stats.setdefault(stage, CacheStats())
        key = self.key(sam, stage, stage_fields, calib)
        if key is None:
            stats.bypassed += 1
            return compute(), False
        entry = self.load(key, stats)
        if entry is not None:
            try:
                restore_(sam, scope, entry, rebuild)
            except Exception as err:  # noqa: BLE001 - whatever went wrong, name the file to delete
                stats.corrupt += 1
                raise RuntimeError(f"prepared-model cache entry {self.path(key)} does not fit the model after "
                                   f"rebuilding it ({err}); delete it, or run with cache.enabled=false") from err
            stats.hits += 1
            stats.hit_seconds += time.perf_counter() - start
            return entry.details, True
        versions = {name: parameter_identity(p) for name, p in scope.named_parameters()}
        details = compute()
        if fp_references(scope):
            logger.info("prepared-model cache: %s left FP references; not stored", stage)
        else:
            try:
                self.write(key, _payload(key, PreparedEntry(changed_state(scope, versions), details,
                                                            rng_states(next(sam.parameters()).device))))
            except (OSError, TypeError, ValueError) as err:  # a full disk or odd details slow the run down only
                logger.warning("prepared-model cache: cannot write %s (%s: %s)", self.path(key), type(err).__name__,
                               err)
        stats.misses += 1
        stats.miss_seconds += time.perf_counter() - start
        return details, False

    def summary(self) -> dict[str, Any]:
        """What the run record keeps: the counts, in all and per stage."""
        return {**self.stats.record(), "stages": {stage: s.record() for stage, s in self.stage_stats.items()}}


def quantizer_keys(scope: nn.Module) -> set[str]:
    """The `state_dict` keys of `scope` that belong to a quantizer (qparams, AdaRound's alpha, extra state)."""
    prefixes = tuple(f"{path}." for path, _ in iter_quantizers(scope))
    return {k for k in scope.state_dict() if k.startswith(prefixes)}


def parameter_identity(param: nn.Parameter) -> tuple[int, int, int]:
    """What changes when a Parameter is written: its object, its storage (`.data` reassigned) and its
    version counter (in-place writes)."""
    return id(param), param.data_ptr(), param._version


def changed_state(scope: nn.Module, versions: Mapping[str, tuple[int, int, int]]) -> dict[str, Any]:
    """The `state_dict` entries of `scope` that a stage writes: every quantizer entry, and every Parameter
    that is new or was written (`parameter_identity`) since `versions` was taken; on CPU."""
    changed = {name for name, p in scope.named_parameters() if parameter_identity(p) != versions.get(name)}
    keep = quantizer_keys(scope) | changed
    return {k: (v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v)
            for k, v in scope.state_dict().items() if k in keep}


def restore_(sam: nn.Module, scope: nn.Module, entry: PreparedEntry, rebuild: Callable[[dict[str, Any]], None]
             ) -> None:
    """Rebuild the structure, load the stored entries into `scope` (checked), set every quantizer of `sam`
    QUANTIZED, set the RNG state. Raises ValueError when the entry does not fit the rebuilt model."""
    rebuild(entry.details)
    missing = sorted(quantizer_keys(scope) - set(entry.state))
    if missing:
        raise ValueError(f"{len(missing)} quantizer entries missing from the file, e.g. '{missing[0]}'")
    device = next(sam.parameters()).device
    result = scope.load_state_dict({k: v.to(device) if isinstance(v, torch.Tensor) else v
                                    for k, v in entry.state.items()}, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected entries, e.g. '{result.unexpected_keys[0]}'")
    set_quant_mode(sam, QuantMode.QUANTIZED)
    uncalibrated = [path for path, q in iter_quantizers(sam) if not q.is_calibrated]
    if uncalibrated:
        raise ValueError(f"{len(uncalibrated)} quantizers uncalibrated after loading, e.g. '{uncalibrated[0]}'")
    elsewhere = [k for k, v in scope.state_dict().items() if isinstance(v, torch.Tensor) and v.device != device]
    if elsewhere:
        raise ValueError(f"{len(elsewhere)} entries not on {device} after loading, e.g. '{elsewhere[0]}'")
    set_rng_states(entry.rng_after, device)


def state_sha256(scope: nn.Module) -> str:
    """SHA-256 of `scope`'s state as a stage sees it: every state entry's name and bytes, and every
    quantizer's class, settings (`extra_repr`: bits, symmetry, granularity, ...), mode and QDrop
    probability (attributes outside the state dict)."""
    digest = hashlib.sha256()
    for name, value in scope.state_dict().items():
        digest.update(name.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    for path, quantizer in iter_quantizers(scope):
        digest.update(f"{path}:{type(quantizer).__name__}({quantizer.extra_repr()}):{quantizer.mode.value}:"
                      f"{quantizer.quant_prob};".encode())
    return digest.hexdigest()


__all__ = ["PREPARED_FORMAT", "PreparedEntry", "PreparedStore", "calibration_fields",
           "changed_state", "prepared_key_fields", "quantizer_keys", "restore_", "source_sha256",
           "state_sha256", "structure_sha256"]

"""One run: resolve -> build model and data -> apply the method -> evaluate -> write the record.

The run folder is created and its `config.yaml` and a `running` record are written before any
heavy work, so a run that fails later still leaves a record saying how it failed; records of other
runs are never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch

from carsam.config import ConfigError, DataConfig, ModelConfig, RunConfig, dump_yaml, to_dict
from carsam.data.coco import CocoBoxPrompts
from carsam.atomic import write_text_atomic
from carsam.data.synthetic import SyntheticSpec, dataset_dir, ensure_dataset
from carsam.diagnostics.run import diagnose_run, diagnostic_images
from carsam.eval.evaluate import box_as_mask_floor, evaluate
from carsam.eval.inference import active_embedding_source, embedding_source
from carsam.hashing import cached_file_sha256
from carsam.methods.registry import get_method
from carsam.models.sam import TESTBED_CHECKPOINT, build_model
from carsam.quant.quantizers import QuantMode, assert_eval_ready, assert_quant_mode
from carsam.runs import CONFIG_FILE, RunRecord, git_commit, library_versions, new_run_id, write_record
from carsam.prepared_cache import PreparedStore, prepared_source
from carsam.stage_cache import EmbeddingStore, EntryStore
from carsam.tracking import Tracker, log_diagnostic_curves

logger = logging.getLogger(__name__)
StoreT = TypeVar("StoreT", bound=EntryStore)


@dataclasses.dataclass
class DataSets:
    """The evaluation set (prompts per `data.prompt_source`) and the calibration subset."""

    val: CocoBoxPrompts
    calib: CocoBoxPrompts


def load_datasets(data: DataConfig, seed: int) -> DataSets:
    """Build (and, for the testbed, generate once) the evaluation and calibration sets."""
    if data.is_synthetic:
        root = ensure_dataset(SyntheticSpec(seed=data.synthetic_seed), dataset_dir(data.synthetic_root,
                                                                                    data.synthetic_seed))
        val_paths = (root / "images" / "val", root / "instances_val.json", root / "prompts_val.json")
        calib_paths = (root / "images" / "calib", root / "instances_calib.json", None)
    else:
        val_paths = (Path(data.images), Path(data.annotations), Path(data.prompts) if data.prompts else None)
        calib_paths = (Path(data.calib_images), Path(data.calib_annotations),
                       Path(data.calib_prompts) if data.calib_prompts else None)
    val = CocoBoxPrompts(*val_paths, prompt_source=data.prompt_source)
    if 0 < data.max_val_images < len(val):
        val = val.subset(data.max_val_images, seed=0)  # the same images whatever the run's seed
    calib_source = "detector" if calib_paths[2] else "gt_boxes"
    calib_pool = CocoBoxPrompts(*calib_paths, prompt_source=calib_source, check_files=False)
    calib = calib_pool.subset(data.calib_size, seed, require_prompts=True)
    return DataSets(val, calib)


def model_description(model: ModelConfig) -> dict[str, Any]:
    """What the record says about the model: type, checkpoint path and its SHA-256."""
    checkpoint = Path(model.checkpoint) if model.checkpoint else TESTBED_CHECKPOINT
    sha = "missing"
    if checkpoint.is_file():
        sha = cached_file_sha256(checkpoint)
    return {"type": model.type, "checkpoint": str(checkpoint), "sha256": sha}


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda[:i]`, or `auto` (CUDA when available); the name is validated by the config."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use device=cpu")
    return device


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = round(time.perf_counter() - start, 3)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (and of the CUDA allocator when on a GPU), in MiB."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"peak_rss_mb": round(rss_kib / 1024, 1)}
    if device.type == "cuda":
        peak["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


FP_BITS = 32  # what records say for the bits of a method that quantizes nothing


def _new_record(config: RunConfig, run_id: str) -> RunRecord:
    quantized = get_method(config.method).quantized
    return RunRecord(
        run_id=run_id, name=config.name or config.method, method=config.method,
        model=model_description(config.model),
        w_bits=config.quant.w_bits if quantized else FP_BITS, a_bits=config.quant.a_bits if quantized else FP_BITS,
        prompts=config.data.prompt_source, seed=config.seed, config=to_dict(config),
        versions=library_versions(), git_commit=git_commit(),
        started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def seed_everything(seed: int) -> None:
    """Seed torch and numpy (the pipeline owns process-wide state; the library never seeds)."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def assert_ready_to_evaluate(sam: torch.nn.Module, quantized: bool) -> None:
    """Every quantizer QUANTIZED, calibrated, deterministic (QDrop probability 1, hard rounding) for a
    quantized method; every quantizer FP otherwise. Also puts the model in eval mode. This is what makes
    PTQ4SAM's evaluation bug (stochastic quantizers left on at test time) impossible here."""
    sam.eval()
    if quantized:
        assert_eval_ready(sam)
    else:
        assert_quant_mode(sam, QuantMode.FP)


def _keep_for_diagnostics(config: RunConfig, sam: torch.nn.Module, val: CocoBoxPrompts,
                          keep: contextlib.ExitStack | None) -> None:
    """Keep the quantized embeddings of the diagnostics images from evaluation until `keep` closes (after
    the diagnostics), so their quantized pass does not encode them again (`EmbeddingStore.keep_quantized`)."""
    store = active_embedding_source()
    if keep is not None and config.diagnostics.enabled and isinstance(store, EmbeddingStore):
        keep.enter_context(store.keep_quantized(sam, val, diagnostic_images(val, config.diagnostics.images)))


def _execute(config: RunConfig, record: RunRecord, progress: bool,
             keep: contextlib.ExitStack | None = None) -> tuple[torch.nn.Module | None, DataSets]:
    """Build, quantize, evaluate; fills `record` in place. Returns the evaluated model (None for a
    model-free method) and the data, for the diagnostics (`keep`: see `_keep_for_diagnostics`)."""
    method = get_method(config.method)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    with _timed(record.timings, "build"):
        sam = build_model(config.model.type, config.model.checkpoint or None).to(device) if method.uses_model else None
        data = load_datasets(config.data, config.seed)
    if sam is None:
        with _timed(record.timings, "evaluate"):
            result = box_as_mask_floor(data.val, progress=progress)
    else:
        with _timed(record.timings, "method"):
            record.details.update(method.apply(sam, data.calib, config))
        assert_ready_to_evaluate(sam, method.quantized)
        _keep_for_diagnostics(config, sam, data.val, keep)
        with _timed(record.timings, "evaluate"):
            result = evaluate(sam, data.val, progress=progress)
    record.metrics.update(result.metrics)
    record.details.update(eval_images=result.num_images, eval_prompts=result.num_prompts, eval_gt=result.num_gt,
                          calib_images=len(data.calib), **peak_memory_mb(device))
    return sam, data


def _diagnose(config: RunConfig, record: RunRecord, run_dir: Path, sam: torch.nn.Module | None,
              data: DataSets) -> pd.DataFrame | None:
    """Write the run's `diagnostics.parquet` and add its `diag/*` metrics to `record`.

    A failure here is logged as a warning and stored in `record.details["diagnostics"]["error"]`: the
    evaluation it follows is never lost to it.
    """
    if not config.diagnostics.enabled:
        return None
    try:
        with _timed(record.timings, "diagnostics"):
            result = diagnose_run(config, record.run_id, run_dir, sam, data.val, record.details,
                                  get_method(config.method).quantized)
    except Exception as err:  # noqa: BLE001 - the run's metrics are already measured; keep them
        logger.warning("diagnostics failed (%s: %s); the run's metrics are kept", type(err).__name__, err)
        record.details["diagnostics"] = {"error": f"{type(err).__name__}: {err}"}
        return None
    record.metrics.update(result.metrics)
    record.details["diagnostics"] = result.details
    return result.frame


def cache_dir(config: RunConfig) -> Path:
    """The stage cache folder: `cache.dir`, or `<runs_dir>/.cache`."""
    return Path(config.cache.dir) if config.cache.dir else Path(config.runs_dir) / ".cache"


def _store(config: RunConfig, kind: type[StoreT]) -> StoreT | None:
    """A stage-cache store of `kind` for the run (None: `cache.enabled=false` or a model-free method)."""
    if not config.cache.enabled or not get_method(config.method).uses_model:
        return None
    return kind(cache_dir(config), model_description(config.model))


def make_embedding_store(config: RunConfig) -> EmbeddingStore | None:
    """The run's on-disk cache of FP image embeddings (None: `cache.enabled=false` or a model-free method)."""
    return _store(config, EmbeddingStore)


def make_prepared_store(config: RunConfig) -> PreparedStore | None:
    """The run's on-disk cache of prepared quantized models (None: `cache.enabled=false` or model-free)."""
    return _store(config, PreparedStore)


def make_tracker(config: RunConfig) -> Tracker:
    """The run's W&B tracker, as `config.tracking` says (tests replace this to keep W&B out)."""
    return Tracker(config.tracking.mode, config.tracking.project, config.tracking.entity or None)


def _start_tracking(config: RunConfig, run_id: str, run_dir: Path) -> Tracker:
    tracker = make_tracker(config)
    tracker.start(to_dict(config), run_id, group=config.tracking.group or None, directory=run_dir)
    return tracker


def _finish_tracking(tracker: Tracker, record: RunRecord, diagnostics: pd.DataFrame | None) -> None:
    """Log the metrics and curves, close the W&B run, and store its id in the record."""
    if tracker.active:
        tracker.log_metrics({**record.metrics, **{f"time/{k}": v for k, v in record.timings.items()}})
        if diagnostics is not None and len(diagnostics):
            log_diagnostic_curves(tracker, diagnostics)
    mode = tracker.mode
    wandb_id = tracker.finish()
    if wandb_id is not None:
        record.details["wandb"] = {"id": wandb_id, "mode": mode}


def _record_cache(record: RunRecord, store: EmbeddingStore | None, prepared: PreparedStore | None) -> None:
    """`details.cache`: the embedding cache's hits, misses, bypassed passes (encoder not FP) and folder, and
    under `prepared` the prepared-model cache's counts."""
    if store is None:
        record.details["cache"] = {"enabled": False}
        return
    record.details["cache"] = {**store.summary(), "prepared": prepared.summary() if prepared is not None else None}


def run(config: RunConfig, *, progress: bool = False, extra: dict[str, Any] | None = None) -> RunRecord:
    """Execute one run and write `runs_dir/<run_id>/{config.yaml,record.json}` (and `diagnostics.parquet`).

    On failure the record is written with `status: failed` and the error, then the error is re-raised.
    The record is also written as soon as the evaluation is done, before the diagnostics.
    `extra` (e.g. a sweep's trial number) is stored under `record.details`.
    """
    run_id = new_run_id(config.name or config.method)
    run_dir = Path(config.runs_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    write_text_atomic(run_dir / CONFIG_FILE, dump_yaml(config))
    record = _new_record(config, run_id)
    record.details.update(extra or {}, command=" ".join(sys.argv))
    write_record(run_dir, record)
    tracker = _start_tracking(config, run_id, run_dir)
    store, prepared = make_embedding_store(config), make_prepared_store(config)
    diagnostics = None
    start = time.perf_counter()
    try:
        with embedding_source(store), prepared_source(prepared), contextlib.ExitStack() as keep:
            sam, data = _execute(config, record, progress, keep)
            _record_cache(record, store, prepared)
            write_record(run_dir, record)  # the evaluation is safe before the diagnostics start
            diagnostics = _diagnose(config, record, run_dir, sam, data)
    except BaseException as err:
        record.status, record.error = "failed", f"{type(err).__name__}: {err}"
        raise
    else:
        record.status = "completed"
    finally:
        _record_cache(record, store, prepared)
        record.timings["total"] = round(time.perf_counter() - start, 3)
        _finish_tracking(tracker, record, diagnostics)
        write_record(run_dir, record)
        logger.info("run %s %s: %s", run_id, record.status, record.metrics)
    return record

"""One run: resolve -> build model and data -> apply the method -> evaluate -> write the record.

The run folder is created and its `config.yaml` and a `running` record are written before any
heavy work, so a run that fails later still leaves a record saying how it failed; records of other
runs are never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from carsam.cache.embeddings import EmbeddingStore
from carsam.cache.prepared import PreparedStore
from carsam.config import ConfigError, DataConfig, ModelConfig, RunConfig, dump_yaml, to_dict
from carsam.data.coco import CocoBoxPrompts, DatasetError
from carsam.data.synthetic import SyntheticSpec, dataset_dir, ensure_dataset
from carsam.diagnostics.run import diagnose_run, diagnostic_images
from carsam.eval.evaluate import EvalResult, box_as_mask_floor, evaluate
from carsam.export.saved import (
    SavedModelError,
    attach_fp_references_,
    load_quantized,
    read_manifest,
    save_quantized,
)
from carsam.files import memoised_file_sha256, write_text_atomic
from carsam.methods.registry import Method, get_method
from carsam.models.checkpoint import load_state_dict
from carsam.models.finite import check_finite_
from carsam.models.sam import build_model
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import assert_eval_ready, assert_quant_mode
from carsam.recon.driver import ReconReport
from carsam.record import (
    CONFIG_FILE,
    INTERRUPTED,
    Heartbeat,
    RunRecord,
    git_commit,
    library_versions,
    new_run_id,
    process_identity,
    write_record,
)
from carsam.run_context import RunContext
from carsam.testbed.shipped import SHIPPED_TESTBEDS
from carsam.tracking import Tracker, log_diagnostic_curves

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DataSets:
    """The evaluation set (prompts per `data.prompt_source`) and the calibration subset (None for a method
    that does not calibrate)."""

    val: CocoBoxPrompts
    calib: CocoBoxPrompts | None


_Paths = tuple[Path, Path, Path | None]  # images, annotations, prompts (None: no prompts file)


def _dataset_paths(data: DataConfig) -> tuple[_Paths, _Paths]:
    """The (val, calib) paths; the testbed's synthetic dataset is generated on first use."""
    if data.is_synthetic:
        spec = SyntheticSpec.for_family(data.synthetic_family, data.synthetic_seed)
        root = ensure_dataset(spec, dataset_dir(data.synthetic_root, spec.seed, spec.family))
        return ((root / "images" / "val", root / "instances_val.json", root / "prompts_val.json"),
                (root / "images" / "calib", root / "instances_calib.json", None))
    return ((Path(data.images), Path(data.annotations), Path(data.prompts) if data.prompts else None),
            (Path(data.calib_images), Path(data.calib_annotations),
             Path(data.calib_prompts) if data.calib_prompts else None))


def _val_set(paths: _Paths, data: DataConfig) -> CocoBoxPrompts:
    val = CocoBoxPrompts(*paths, prompt_source=data.prompt_source)
    if 0 < data.max_val_images < len(val):
        val = val.subset(data.max_val_images, seed=0)
    if not val.num_gt_instances:
        raise DatasetError(f"the evaluation set {val.annotations_file} has no ground-truth instance on its "
                           f"{len(val)} image(s): its mAP would be 0 whatever the model; use an annotated set")
    return val


def load_val_set(data: DataConfig) -> CocoBoxPrompts:
    """The evaluation set (prompts per `data.prompt_source`; `data.max_val_images` of them, the same
    images whatever the run's seed)."""
    return _val_set(_dataset_paths(data)[0], data)


def load_datasets(data: DataConfig, seed: int, calibrate: bool = True) -> DataSets:
    """Build (and, for the testbed, generate once) the evaluation and calibration sets; without `calibrate`
    (a method that does not calibrate) the calibration set is None and its files are never read."""
    val_paths, calib_paths = _dataset_paths(data)
    val = _val_set(val_paths, data)
    if not calibrate:
        return DataSets(val, None)
    calib_source = "detector" if calib_paths[2] else "gt_boxes"
    calib_pool = CocoBoxPrompts(*calib_paths, prompt_source=calib_source, check_files=False)
    try:
        calib = calib_pool.subset(data.calib_size, seed, require_prompts=True)
    except DatasetError as err:
        raise DatasetError(f"data.calib_size = {data.calib_size}: {err}") from err
    return DataSets(val, calib)


def model_description(model: ModelConfig) -> dict[str, Any]:
    """What the record says about the model: type, checkpoint path and its SHA-256."""
    checkpoint = Path(model.checkpoint) if model.checkpoint else SHIPPED_TESTBEDS[model.type].checkpoint
    sha = "missing"
    if checkpoint.is_file():
        sha = memoised_file_sha256(checkpoint)
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


def _new_record(config: RunConfig, method: Method, model: dict[str, Any], run_id: str) -> RunRecord:
    quantized = method.quantized
    return RunRecord(
        run_id=run_id, name=config.name or config.method, method=config.method, model=model,
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


def _evaluate(sam: torch.nn.Module | None, data: DataSets, context: RunContext) -> EvalResult:
    """The evaluation of the method's model (or of the box-as-mask floor without one)."""
    if sam is None:
        return box_as_mask_floor(data.val, progress=context.progress)
    return evaluate(sam, data.val, progress=context.progress, source=context.embeddings)


def _keep_for_diagnostics(config: RunConfig, sam: torch.nn.Module | None, data: DataSets, images: list[int],
                          context: RunContext) -> contextlib.AbstractContextManager[None]:
    """Keep the quantized embeddings of the diagnostics `images` from evaluation to the diagnostics, so their
    quantized pass does not encode them again (`EmbeddingStore.keep_quantized`); a no-op without a store."""
    if sam is None or context.embeddings is None or not config.diagnostics.enabled:
        return contextlib.nullcontext()
    return context.embeddings.keep_quantized(sam, data.val, images)


def _load_saved(config: RunConfig, saved: Path, record: RunRecord, device: torch.device
                ) -> tuple[torch.nn.Module, DataSets, None]:
    """The model saved in the run folder `saved` (instead of building and quantizing one), with FP references
    from the FP checkpoint (so diagnostics' FP passes run the FP model), and the evaluation data."""
    manifest = read_manifest(saved)
    if manifest["model"].get("sha256") != record.model["sha256"]:
        raise SavedModelError(f"the FP checkpoint {record.model['checkpoint']} is not the one the model in {saved} "
                              f"was quantized from ({manifest['model'].get('checkpoint')}, SHA-256 "
                              f"{str(manifest['model'].get('sha256'))[:12]}…): set model.checkpoint to that file")
    with _timed(record.timings, "build"):
        sam = load_quantized(saved, manifest).to(device)
        references = attach_fp_references_(sam, load_state_dict(record.model["checkpoint"]))
        check_finite_(sam, f"loading the saved model in {saved}")
        data = load_datasets(config.data, config.seed, calibrate=False)
        record.details["data"] = data_description(data)
    record.details["source_run"] = {"run_id": manifest.get("run_id"), "dir": str(saved),
                                    "weights_sha256": manifest["weights_sha256"], "fp_references": references}
    assert_ready_to_evaluate(sam, quantized=True)
    return sam, data, None


def _execute(config: RunConfig, method: Method, record: RunRecord, context: RunContext, device: torch.device
             ) -> tuple[torch.nn.Module | None, DataSets, ReconReport | None]:
    """Build and quantize on `device`; fills `record` in place. Returns the quantized model (None for a
    model-free method), the data, and the method's reconstruction report (None if it reconstructs nothing)."""
    seed_everything(config.seed)
    with _timed(record.timings, "build"):
        sam = build_model(config.model.type, config.model.checkpoint or None,
                          config.model.sam2_stability_fallback).to(device) if method.uses_model else None
        if sam is not None:
            check_finite_(sam, f"loading the checkpoint {record.model['checkpoint']}")
        data = load_datasets(config.data, config.seed, calibrate=method.quantized)
        record.details["data"] = data_description(data)
    recon = None
    if sam is not None:
        with _timed(record.timings, "method"):
            # a method that does not quantize (fp) leaves the model as it is and has no calibration set
            details = method.apply(sam, data.calib, config, context) if data.calib is not None else {}
        recon = details.get("recon") if isinstance(details.get("recon"), ReconReport) else None
        record.details.update({**details, "recon": recon.record()} if recon is not None else details)
        check_finite_(sam, f"method {config.method}")
        assert_ready_to_evaluate(sam, method.quantized)
    record.details["calib_images"] = len(data.calib) if data.calib is not None else 0
    return sam, data, recon


def data_description(data: DataSets) -> dict[str, Any]:
    """`details.data`: each set's files with their content hashes, and the calibration image ids."""
    return {"val": data.val.fingerprint(),
            "calib": data.calib.fingerprint(list_ids=True) if data.calib is not None else None}


SEGM_RESULTS_FILE = "segm_results.json"
GT_BOX_SEGM_RESULTS_FILE = "segm_results_gt_boxes.json"


def _record_evaluation(record: RunRecord, run_dir: Path, result: EvalResult, data: DataSets,
                       device: torch.device) -> None:
    """The evaluation's metrics and counts into `record`, and its scored masks into `run_dir/segm_results.json`
    (COCO results format: re-scored by pycocotools alone against the annotations file on the evaluated image
    ids, which `details.segm_results` names, it gives the record's mAP). The GT-box decodes go to
    `segm_results_gt_boxes.json` (gives `eval/gt_box_mAP`), the same file when the prompts are the GT boxes."""
    write_text_atomic(run_dir / SEGM_RESULTS_FILE, json.dumps(result.results))
    gt_box_file = SEGM_RESULTS_FILE
    if data.val.prompt_source != "gt_boxes":
        gt_box_file = GT_BOX_SEGM_RESULTS_FILE
        write_text_atomic(run_dir / gt_box_file, json.dumps(result.gt_box_results))
    record.metrics.update(result.metrics)
    record.details.update(eval_images=result.num_images, eval_prompts=result.num_prompts, eval_gt=result.num_gt,
                          segm_results={"file": SEGM_RESULTS_FILE, "gt_box_file": gt_box_file,
                                        "annotations": str(data.val.annotations_file),
                                        "image_ids": result.image_ids},
                          **peak_memory_mb(device))


def _diagnose(config: RunConfig, method: Method, record: RunRecord, run_dir: Path, sam: torch.nn.Module | None,
              data: DataSets, images: list[int], recon: ReconReport | None, context: RunContext
              ) -> pd.DataFrame | None:
    """Write the run's `diagnostics.parquet` and add its `diag/*` metrics to `record`.

    A failure here is logged as a warning and stored in `record.details["diagnostics"]["error"]`: the
    evaluation it follows is never lost to it.
    """
    if not config.diagnostics.enabled:
        return None
    try:
        with _timed(record.timings, "diagnostics"):
            result = diagnose_run(config, record.run_id, run_dir, sam, data.val, recon, method.quantized,
                                  images=images, source=context.embeddings)
    except Exception as err:  # noqa: BLE001 - the run's metrics are already measured; keep them
        logger.warning("diagnostics failed (%s: %s); the run's metrics are kept", type(err).__name__, err)
        record.details["diagnostics"] = {"error": f"{type(err).__name__}: {err}"}
        return None
    record.metrics.update(result.metrics)
    record.details["diagnostics"] = result.details
    return result.frame


def _save_model(config: RunConfig, record: RunRecord, run_dir: Path, sam: torch.nn.Module | None) -> None:
    """Write the quantized model into `run_dir` when `config.saves_model` (`details.saved_model`). A failure
    (e.g. a full disk) is logged and stored as `details.saved_model.error`: the evaluation is kept."""
    if sam is None or not config.saves_model:
        return
    try:
        with _timed(record.timings, "save_model"):
            record.details["saved_model"] = save_quantized(sam, run_dir, record.model, config.quant,
                                                           {"run_id": record.run_id, "method": record.method})
    except (OSError, RuntimeError, ValueError) as err:
        logger.warning("saving the quantized model failed (%s: %s); the run's metrics are kept",
                       type(err).__name__, err)
        record.details["saved_model"] = {"error": f"{type(err).__name__}: {err}"}


def cache_dir(config: RunConfig) -> Path:
    """The stage cache folder: `cache.dir`, or `<runs_dir>/.cache`."""
    return Path(config.cache.dir) if config.cache.dir else Path(config.runs_dir) / ".cache"


def make_context(config: RunConfig, method: Method, model: dict[str, Any], progress: bool) -> RunContext:
    """The run's stores (`cache.enabled` and a method that uses the model: both on-disk stage caches under
    `cache_dir(config)`, keyed by `model`, the record's model description) and switches."""
    if not config.cache.enabled or not method.uses_model:
        return RunContext(progress=progress)
    folder = cache_dir(config)
    return RunContext(embeddings=EmbeddingStore(folder, model), prepared=PreparedStore(folder, model),
                      progress=progress)


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


def _record_cache(record: RunRecord, context: RunContext) -> None:
    """`details.cache`: the embedding cache's hits, misses, bypassed passes (encoder not FP) and folder, and
    under `prepared` the prepared-model cache's counts."""
    if context.embeddings is None:
        record.details["cache"] = {"enabled": False}
        return
    prepared = context.prepared.summary() if context.prepared is not None else None
    record.details["cache"] = {**context.embeddings.summary(), "prepared": prepared}


def run(config: RunConfig, *, progress: bool = False, extra: dict[str, Any] | None = None,
        saved: Path | None = None) -> RunRecord:
    """Execute one run and write `runs_dir/<run_id>/{config.yaml,record.json}` (and `diagnostics.parquet`, and
    the quantized model when `config.saves_model`).

    On failure the record is written with `status: failed` and the error, then the error is re-raised.
    The record is also written as soon as the evaluation is done, before the diagnostics.
    `extra` (e.g. a sweep's trial number) is stored under `record.details`. With `saved` (a run folder holding
    a saved model, `carsam eval`) the model is loaded from it instead of built and quantized by the method.
    """
    method, model = get_method(config.method), model_description(config.model)
    run_id = new_run_id(config.name or config.method)
    run_dir = Path(config.runs_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    record = _new_record(config, method, model, run_id)
    # the intra-op thread count changes the last bits of reductions, which a reconstruction can amplify
    record.details.update(extra or {}, command=" ".join(sys.argv), torch_threads=torch.get_num_threads(),
                          process=process_identity())
    try:
        write_text_atomic(run_dir / CONFIG_FILE, dump_yaml(config))
        write_record(run_dir, record)
    except OSError:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing was run: leave no empty run folder behind
        raise
    heartbeat = Heartbeat(run_dir).start()
    tracker = _start_tracking(config, run_id, run_dir)
    context = make_context(config, method, model, progress)
    diagnostics = None
    start = time.perf_counter()
    try:
        device = resolve_device(config.device)
        if saved is None:
            sam, data, recon = _execute(config, method, record, context, device)
        else:
            sam, data, recon = _load_saved(config, saved, record, device)
        images = diagnostic_images(data.val, config.diagnostics.images) if config.diagnostics.enabled else []
        with _keep_for_diagnostics(config, sam, data, images, context):
            with _timed(record.timings, "evaluate"):
                result = _evaluate(sam, data, context)
            _record_evaluation(record, run_dir, result, data, device)
            _record_cache(record, context)
            write_record(run_dir, record)  # the evaluation is safe before the diagnostics start
            if saved is None:
                _save_model(config, record, run_dir, sam)
            diagnostics = _diagnose(config, method, record, run_dir, sam, data, images, recon, context)
    except (KeyboardInterrupt, SystemExit) as err:  # Ctrl-C, SIGTERM (`carsam.cli`), or a library's exit
        record.status, record.error = INTERRUPTED, f"interrupted ({type(err).__name__}{f': {err}' if str(err) else ''})"
        raise
    except BaseException as err:
        record.status, record.error = "failed", f"{type(err).__name__}: {err}"
        raise
    else:
        record.status = "completed"
    finally:
        heartbeat.stop()
        _record_cache(record, context)
        record.timings["total"] = round(time.perf_counter() - start, 3)
        _finish_tracking(tracker, record, diagnostics)
        write_record(run_dir, record)
        logger.info("run %s %s: %s", run_id, record.status, record.metrics)
    return record

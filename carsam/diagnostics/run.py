"""A run's diagnostics: collect them after evaluation, write `diagnostics.parquet`, summarise for the record.

`diagnose_run` gathers, for one finished run,
- the attention statistics of the quantized model against its FP self (`collect_attention_stats`) on the
  first `diagnostics.images` val images that have prompts (the same images for every run of a dataset),
  over the requested scopes that the run quantized (a scope left in FP has nothing to compare);
- when the decoder is among them, the token->image attention maps of a few of those prompts
  (`collect_attention_maps`, written to `attention_maps.npz`);
- the reconstruction loss curves with their oscillation indices, and the boundary errors and
  cross-branch interference, from the method's `ReconReport` (methods that reconstruct);
then writes them as one long table and returns it with its `diag/*` summary numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from carsam.config import RunConfig
from carsam.data.coco import CocoBoxPrompts
from carsam.diagnostics.collector import collect_attention_stats
from carsam.diagnostics.maps import MAPS_FILE, collect_attention_maps, write_attention_maps
from carsam.diagnostics.oscillation import interference_frame, oscillation_frame
from carsam.diagnostics.writer import DIAGNOSTICS_FILE, diagnostics_frame, summary_metrics, write_diagnostics_frame
from carsam.eval.inference import EmbeddingSource
from carsam.recon.driver import ReconReport

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunDiagnostics:
    """What `diagnose_run` produced: the long table, its `diag/*` metrics, and what went into it."""

    frame: pd.DataFrame
    metrics: dict[str, float]
    details: dict[str, Any]


def diagnostic_images(dataset: CocoBoxPrompts, count: int) -> list[int]:
    """The first `count` image ids of `dataset` (in its order) that have at least one prompt box."""
    chosen: list[int] = []
    for image_id in dataset.image_ids:
        if len(chosen) == count:
            break
        if len(dataset.prompts(image_id)[0]) > 0:
            chosen.append(image_id)
    return chosen


def quantized_scopes(config: RunConfig) -> list[str]:
    """The requested `diagnostics.scopes` that the run quantizes (in the requested order)."""
    quantized = {"decoder": config.quant.quantize_decoder, "encoder": config.quant.quantize_encoder}
    return [scope for scope in config.diagnostics.scopes if quantized[scope]]


def recon_frames(recon: ReconReport | None, window: int) -> list[pd.DataFrame]:
    """Loss curves + oscillation indices and boundary errors + interference of a reconstruction."""
    if recon is None:
        return []
    frames = [oscillation_frame(recon.units, window)]
    if recon.interference:
        frames.append(interference_frame(recon.interference))
    return frames


def diagnose_run(config: RunConfig, run_id: str, run_dir: str | Path, sam: nn.Module | None,
                 val: CocoBoxPrompts, recon: ReconReport | None, quantized: bool, *,
                 images: Sequence[int] | None = None, source: EmbeddingSource | None = None) -> RunDiagnostics:
    """Collect, write `run_dir/diagnostics.parquet` and summarise this run's diagnostics.

    sam: the evaluated model (None for model-free methods); attention statistics need it quantized.
    recon: the method's reconstruction report (None if it reconstructs nothing): the loss curves and
    interference. images: the val images of the attention statistics (None: `diagnostic_images` of
    `diagnostics.images`). source: where the attention passes get image embeddings (None: encode).
    """
    settings = config.diagnostics
    frames: list[pd.DataFrame] = []
    info: dict[str, Any] = {"file": DIAGNOSTICS_FILE}
    start = time.perf_counter()
    scopes = quantized_scopes(config) if quantized and sam is not None else []
    if scopes:
        assert sam is not None  # scopes is empty when sam is None
        images = diagnostic_images(val, settings.images) if images is None else list(images)
        frames.append(collect_attention_stats(sam, val, images, scopes, iou_threshold=settings.iou_threshold,
                                              source=source))
        info.update(images=images, scopes=scopes)
        map_images = images[:settings.map_images]
        if "decoder" in scopes and map_images and settings.map_prompts:
            maps = collect_attention_maps(sam, val, map_images, settings.map_prompts, source=source)
            write_attention_maps(run_dir, maps)
            info["maps"] = {"file": MAPS_FILE, "images": map_images, "prompts": len(maps.fp)}
    else:
        info["attention"] = "skipped: the run quantizes none of diagnostics.scopes"
    frames += recon_frames(recon, settings.oscillation_window)
    frame = diagnostics_frame(run_id, frames)
    write_diagnostics_frame(run_dir, frame)
    info.update(rows=len(frame), seconds=round(time.perf_counter() - start, 3))
    logger.info("diagnostics: %d rows in %.1fs -> %s", len(frame), info["seconds"], Path(run_dir) / DIAGNOSTICS_FILE)
    return RunDiagnostics(frame, summary_metrics(frame), info)


__all__ = ["RunDiagnostics", "diagnose_run", "diagnostic_images", "quantized_scopes", "recon_frames"]

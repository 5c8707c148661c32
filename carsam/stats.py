"""The `carsam stats` flow: build the FP model (or a random initialisation of an architecture), wrap its
attentions in FP-mode twins, run the protocol's passes over a few val images, and write the statistics
folder (`carsam.report.statistics`). Measured the same way for any SAM, so the testbed can be set beside
real SAM (docs/testbed.md).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from carsam.config import RunConfig
from carsam.diagnostics.statistics import collect_statistics
from carsam.files import memoised_file_sha256
from carsam.models.quantize import QuantConfig, quantize_
from carsam.models.sam import build_model, build_random_model
from carsam.pipeline import load_val_set, model_description, resolve_device, seed_everything
from carsam.record import git_commit, library_versions
from carsam.report.statistics import write_statistics

logger = logging.getLogger(__name__)


def measure_statistics(config: RunConfig, out: str | Path, *, images: int = 20, random_init: str | None = None
                       ) -> list[Path]:
    """Statistics of `config.model` (or of a random `random_init` architecture: `testbed`, `vit_b`, ...; seeded by
    `config.seed`) over `images` val images of `config.data` (the subset `data.max_val_images=images` selects,
    the same whatever the seed), with the prompts `data.prompt_source` names. Writes
    `out/statistics.{parquet,md,png,json}`; returns the paths. The data are checked before the model is built."""
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    val = load_val_set(dataclasses.replace(config.data, max_val_images=images))
    seed_everything(config.seed)
    device = resolve_device(config.device)
    model: dict[str, Any]
    if random_init:
        sam = build_random_model(random_init)
        model = {"type": random_init, "checkpoint": f"random initialisation (seed {config.seed})", "sha256": None}
    else:
        sam = build_model(config.model.type, config.model.checkpoint or None, config.model.sam2_stability_fallback)
        model = model_description(config.model)
    sam = quantize_(sam.to(device), QuantConfig())  # FP twins: every MatMul operand readable, outputs unchanged
    frame = collect_statistics(sam, val, val.image_ids)  # eval mode and no_grad inside
    title = f"{model['type']}: {model['checkpoint']}"
    provenance = {
        "model": model, "prompts": config.data.prompt_source, "images": val.image_ids,
        "data": {"annotations": str(val.annotations_file), "sha256": memoised_file_sha256(val.annotations_file)},
        "seed": config.seed, "versions": library_versions(), "git_commit": git_commit(),
        "command": " ".join(sys.argv), "torch_threads": torch.get_num_threads(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    paths = write_statistics(out, frame, provenance, title)
    logger.info("statistics of %s over %d images -> %s", title, len(val), Path(out))
    return paths


__all__ = ["measure_statistics"]

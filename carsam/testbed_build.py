"""`carsam testbed build`: generate the synthetic data, train the testbed SAM, write checkpoint and card.

The card (`testbed.json`) holds the training recipe, the architecture, the training time, the loss
history and the FP metrics on the validation split (detector prompts for mAP, GT boxes for mIoU),
so the shipped checkpoint can be traced and rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from carsam.data.coco import CocoBoxPrompts
from carsam.data.synthetic import SyntheticSpec, ensure_dataset
from carsam.eval.evaluate import evaluate
from carsam.models.sam import ASSETS, TestbedSpec, build_testbed_from_checkpoint, build_testbed_sam
from carsam.runs import git_commit, library_versions, write_atomic
from carsam.testbed import TrainSpec, load_training_set, save_checkpoint, train_testbed

logger = logging.getLogger(__name__)


def train_from_scratch(root: Path, train_spec: TrainSpec, model_spec: TestbedSpec) -> tuple[Any, list[dict], float]:
    """Seeded init + training on `root`'s train split; returns (model, history, seconds)."""
    torch.manual_seed(train_spec.seed)
    start = time.perf_counter()
    sam = build_testbed_sam(model_spec)
    data = load_training_set(root / "images" / "train", root / "instances_train.json", model_spec.img_size)
    history = train_testbed(sam, data, train_spec)
    return sam, history, time.perf_counter() - start


def fp_metrics(checkpoint: Path, root: Path) -> dict[str, float]:
    """FP metrics of the stored (fp16 -> fp32) checkpoint on the val split."""
    val = CocoBoxPrompts(root / "images" / "val", root / "instances_val.json", root / "prompts_val.json")
    return evaluate(build_testbed_from_checkpoint(checkpoint), val).metrics


def write_card(out_dir: Path, checkpoint: Path, root: Path, data_spec: SyntheticSpec, train_spec: TrainSpec,
               history: list[dict], seconds: float) -> dict[str, Any]:
    """Write `out_dir/testbed.json` describing the checkpoint; returns the card."""
    card = {
        "checkpoint": str(checkpoint), "checkpoint_bytes": checkpoint.stat().st_size, "storage_dtype": "float16",
        "testbed_spec": dataclasses.asdict(TestbedSpec()), "train_spec": dataclasses.asdict(train_spec),
        "data_spec": dataclasses.asdict(data_spec), "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(), "fp_metrics": fp_metrics(checkpoint, root),
        "history": history, "versions": library_versions(), "git_commit": git_commit(),
    }
    write_atomic(out_dir / "testbed.json", json.dumps(card, indent=1))
    return card


def build_testbed(data_root: str = "data", seed: int = 0, steps: int | None = None,
                  out_dir: str | Path | None = None) -> dict[str, Any]:
    """Generate data of `seed`, train, and write `testbed_sam.pth` + `testbed.json` into `out_dir`."""
    data_spec = SyntheticSpec(seed=seed)
    root = ensure_dataset(data_spec, Path(data_root) / f"testbed-seed{seed}", ("train", "calib", "val"))
    train_spec = TrainSpec(seed=seed, **({"steps": steps} if steps else {}))
    sam, history, seconds = train_from_scratch(root, train_spec, TestbedSpec())
    out = Path(out_dir) if out_dir else ASSETS
    checkpoint = save_checkpoint(sam, out / "testbed_sam.pth")
    return write_card(out, checkpoint, root, data_spec, train_spec, history, seconds)

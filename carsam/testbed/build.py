"""`carsam testbed build`: generate the synthetic data, train the testbed SAM, write checkpoint and card.

The card (`testbed.json`) holds the training recipe, the architecture, the training time, the loss
history, the SHA-256 of the checkpoint and of the training annotations, and the FP metrics on the
validation split (detector prompts for mAP, GT boxes for mIoU), so the shipped checkpoint can be
traced and rebuilt. The new checkpoint replaces an existing one only once its card is computed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam

from carsam.data.coco import CocoBoxPrompts
from carsam.data.synthetic import SyntheticSpec, dataset_dir, ensure_dataset
from carsam.eval.evaluate import evaluate
from carsam.files import file_sha256, write_text_atomic
from carsam.record import git_commit, library_versions
from carsam.testbed.spec import TestbedSpec, build_testbed_from_checkpoint, build_testbed_sam
from carsam.testbed.train import TrainSpec, load_training_set, save_checkpoint, train_testbed

logger = logging.getLogger(__name__)
CHECKPOINT_NAME = "testbed_sam.pth"
CARD_NAME = "testbed.json"


def train_from_scratch(root: Path, train_spec: TrainSpec, model_spec: TestbedSpec) -> tuple[Sam, list[dict], float]:
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


def publish(sam: Sam, out_dir: Path, root: Path, data_spec: SyntheticSpec, train_spec: TrainSpec,
            history: list[dict], seconds: float) -> dict[str, Any]:
    """Save `sam` and its card into `out_dir`; an existing pair is replaced only after the card is ready."""
    staged = save_checkpoint(sam, out_dir / f"{CHECKPOINT_NAME}.new")
    card = {
        "checkpoint": CHECKPOINT_NAME, "checkpoint_bytes": staged.stat().st_size,
        "checkpoint_sha256": file_sha256(staged), "storage_dtype": "float16",
        "testbed_spec": dataclasses.asdict(TestbedSpec()), "train_spec": dataclasses.asdict(train_spec),
        "data_spec": dataclasses.asdict(data_spec),
        "train_annotations_sha256": file_sha256(root / "instances_train.json"),
        "train_seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
        "fp_metrics": fp_metrics(staged, root), "history": history,
        "versions": library_versions(), "git_commit": git_commit(),
    }
    staged.replace(out_dir / CHECKPOINT_NAME)
    write_text_atomic(out_dir / CARD_NAME, json.dumps(card, indent=1))
    return card


def build_testbed(data_root: str | Path = "data", seed: int = 0, steps: int | None = None,
                  out_dir: str | Path = "build/testbed") -> dict[str, Any]:
    """Generate the data of `seed`, train, and write `testbed_sam.pth` + `testbed.json` into `out_dir`.

    The shipped pair lives in `carsam/testbed/`; copy a new build there to ship it.
    """
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be a positive number of training steps, got {steps}")
    data_spec = SyntheticSpec(seed=seed)
    root = ensure_dataset(data_spec, dataset_dir(data_root, seed), ("train", "calib", "val"))
    train_spec = TrainSpec(seed=seed, **({"steps": steps} if steps else {}))
    sam, history, seconds = train_from_scratch(root, train_spec, TestbedSpec())
    return publish(sam, Path(out_dir), root, data_spec, train_spec, history, seconds)

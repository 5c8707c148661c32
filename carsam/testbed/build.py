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
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam

from carsam.data.coco import CocoBoxPrompts
from carsam.data.synthetic import SyntheticSpec, dataset_dir, ensure_dataset
from carsam.eval.evaluate import evaluate
from carsam.files import file_sha256, write_text_atomic
from carsam.record import git_commit, library_versions
from carsam.testbed.frames import frame_for
from carsam.testbed.shipped import ARCHITECTURES, Architecture
from carsam.testbed.train import TrainSpec, init_token_embeddings_, load_training_set, save_checkpoint, train_testbed

logger = logging.getLogger(__name__)
CHECKPOINT_NAME = "testbed_sam.pth"
CARD_NAME = "testbed.json"


TRAIN_STATE_NAME = "train_state.pt"


def train_from_scratch(root: Path, train_spec: TrainSpec, arch: Architecture,
                       state_path: Path | None = None) -> tuple[Sam, list[dict], float]:
    """Seeded init + training on `root`'s train split (resumed from `state_path` if it exists); returns
    (model, history, training seconds over every session)."""
    torch.manual_seed(train_spec.seed)
    sam = arch.build(arch.spec)
    init_token_embeddings_(sam, train_spec.token_init_std, train_spec.token_init_scope)
    data = load_training_set(root / "images" / "train", root / "instances_train.json", frame_for(sam))
    history = train_testbed(sam, data, train_spec, state_path)
    return sam, history, history[-1]["seconds"] if history else 0.0


def fp_metrics(checkpoint: Path, root: Path, arch: Architecture) -> dict[str, float]:
    """FP metrics of the stored (fp16 -> fp32) checkpoint on the val split."""
    val = CocoBoxPrompts(root / "images" / "val", root / "instances_val.json", root / "prompts_val.json")
    return evaluate(arch.from_checkpoint(checkpoint, arch.spec), val).metrics


def publish(sam: Sam, out_dir: Path, root: Path, data_spec: SyntheticSpec, train_spec: TrainSpec,
            history: list[dict], seconds: float, architecture: str) -> dict[str, Any]:
    """Save `sam` and its card into `out_dir`; an existing pair is replaced only after the card is ready."""
    staged = save_checkpoint(sam, out_dir / f"{CHECKPOINT_NAME}.new")
    arch = ARCHITECTURES[architecture]
    card = {
        "checkpoint": CHECKPOINT_NAME, "checkpoint_bytes": staged.stat().st_size,
        "checkpoint_sha256": file_sha256(staged), "storage_dtype": "float16",
        "architecture": architecture, "testbed_spec": dataclasses.asdict(arch.spec),
        "train_spec": dataclasses.asdict(train_spec),
        "data_spec": dataclasses.asdict(data_spec),
        "train_annotations_sha256": file_sha256(root / "instances_train.json"),
        "train_seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
        "fp_metrics": fp_metrics(staged, root, arch), "history": history,
        "versions": library_versions(), "git_commit": git_commit(),
    }
    staged.replace(out_dir / CHECKPOINT_NAME)
    write_text_atomic(out_dir / CARD_NAME, json.dumps(card, indent=1))
    return card


def build_testbed(data_root: str | Path = "data", seed: int = 0, steps: int | None = None,
                  out_dir: str | Path = "build/testbed", recipe: dict[str, Any] | None = None,
                  family: str = "shapes", architecture: str = "sam") -> dict[str, Any]:
    """Generate the data of `family` and `seed`, train, and write `testbed_sam.pth` + `testbed.json` into `out_dir`.

    `architecture`: `sam` (the v1 testbed's, `TestbedSpec`) or `sam2` (the SAM2 testbed's, `Sam2TestbedSpec`).

    `recipe` overrides `TrainSpec` fields (e.g. `{"decay_scope": "matrices"}`); `steps` overrides its steps.
    The training state is kept in `out_dir/train_state.pt` every `checkpoint_every` steps, so an interrupted
    build resumes where it stopped when run again with the same arguments (a state of another recipe is
    refused). The shipped pairs live in `carsam/testbed/` (`carsam.testbed.shipped`); copy a new build there to ship it.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {tuple(ARCHITECTURES)}, got '{architecture}'")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be a positive number of training steps, got {steps}")
    fields = {f.name for f in dataclasses.fields(TrainSpec)} - {"seed"}
    unknown = sorted(set(recipe or {}) - fields)
    if unknown:
        raise ValueError(f"unknown training field(s) {unknown}; valid: {sorted(fields)}")
    data_spec = SyntheticSpec.for_family(family, seed)
    root = ensure_dataset(data_spec, dataset_dir(data_root, seed, family), ("train", "calib", "val"))
    train_spec = TrainSpec(seed=seed, **{**(recipe or {}), **({"steps": steps} if steps else {})})
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    arch = ARCHITECTURES[architecture]
    sam, history, seconds = train_from_scratch(root, train_spec, arch, folder / TRAIN_STATE_NAME)
    return publish(sam, folder, root, data_spec, train_spec, history, seconds, architecture)

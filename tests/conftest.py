"""Shared fixtures: a small synthetic COCO-format set and testbed checkpoints, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from carsam.data.coco import CocoBoxPrompts
from carsam.data.synthetic import generate_split
from carsam.testbed.spec import build_testbed_sam
from carsam.testbed.train import save_checkpoint
from tests.helpers import SMALL_SPEC


@pytest.fixture(autouse=True)
def _no_wandb_unless_asked(request, monkeypatch) -> None:
    """In-process runs track nothing unless the test is marked `wandb` (W&B offline costs seconds per run);
    the tests of tracking itself opt in."""
    if request.node.get_closest_marker("wandb") is None:
        from carsam import pipeline
        from carsam.tracking import Tracker
        monkeypatch.setattr(pipeline, "make_tracker", lambda config: Tracker("disabled"))


@pytest.fixture(scope="session")
def small_coco(tmp_path_factory) -> dict[str, Path]:
    """A 4-image calibration split and a 6-image validation split in COCO format (seed 7)."""
    root = tmp_path_factory.mktemp("small_coco")
    calib = generate_split(SMALL_SPEC, "calib", root)
    val = generate_split(SMALL_SPEC, "val", root)
    return {"root": root, "calib_images": calib["images"], "calib_annotations": calib["annotations"],
            "images": val["images"], "annotations": val["annotations"], "prompts": val["prompts"]}


@pytest.fixture(scope="session")
def random_testbed_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised testbed SAM stored like the shipped one (fp16 state dict)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    sam = build_testbed_sam()
    torch.random.set_rng_state(gen_state)
    return save_checkpoint(sam, tmp_path_factory.mktemp("ckpt") / "random_testbed.pth")


@pytest.fixture(scope="module")
def calib2(small_coco) -> CocoBoxPrompts:
    """Two calibration images (GT-box prompts) of the small synthetic set."""
    pool = CocoBoxPrompts(small_coco["calib_images"], small_coco["calib_annotations"], None, prompt_source="gt_boxes")
    return pool.subset(2, seed=0, require_prompts=True)

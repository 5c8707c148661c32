"""Fixtures of the diagnostics tests: the small val split and a calibrated W4A4 random testbed."""

from __future__ import annotations

import pytest
from segment_anything.modeling import Sam

from carsam.data.coco import CocoBoxPrompts
from carsam.methods.calibrate import calibrate_
from carsam.models.quantize import QuantConfig, quantize_
from carsam.testbed.spec import build_testbed_from_checkpoint


@pytest.fixture(scope="module")
def val(small_coco) -> CocoBoxPrompts:
    """The small validation split with its detector prompts (noisy boxes and false positives)."""
    return CocoBoxPrompts(small_coco["images"], small_coco["annotations"], small_coco["prompts"])


@pytest.fixture(scope="module")
def w4a4(random_testbed_checkpoint, small_coco) -> Sam:
    """The random testbed quantized W4A4 (encoder and decoder), calibrated on 2 images."""
    calib = CocoBoxPrompts(small_coco["calib_images"], small_coco["calib_annotations"], None,
                           prompt_source="gt_boxes").subset(2, seed=0, require_prompts=True)
    sam = build_testbed_from_checkpoint(random_testbed_checkpoint)
    quantize_(sam, QuantConfig(w_bits=4, a_bits=4, w_observer="minmax"))
    return calibrate_(sam, calib)

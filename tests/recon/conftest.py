"""Fixtures for the reconstruction tests: a decoder-quantized, calibrated testbed and a 2-image calibration set."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling import Sam

from carsam.methods.calibrate import calibrate_
from carsam.models.quantize import QuantConfig, quantize_
from carsam.testbed.spec import build_testbed_from_checkpoint


@pytest.fixture(scope="module")
def _calibrated_w4a4(random_testbed_checkpoint, calib2) -> Sam:
    sam = build_testbed_from_checkpoint(random_testbed_checkpoint)
    quantize_(sam, QuantConfig(w_bits=4, a_bits=4, w_observer="minmax", quantize_encoder=False))
    return calibrate_(sam, calib2)


@pytest.fixture
def qsam(_calibrated_w4a4) -> Sam:
    """A fresh copy of the random-init testbed, decoder quantized W4A4 and calibrated on `calib2`."""
    torch.manual_seed(0)
    return copy.deepcopy(_calibrated_w4a4)

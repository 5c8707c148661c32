"""Fixtures of the export tests: a quantized testbed with every structure change a method makes, and a small
CAR-SAM run whose model is saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from carsam import pipeline
from carsam.config import resolve
from carsam.models.quantize import QuantConfig, calibrate_weights_, quantize_
from carsam.models.sam import build_model
from carsam.quant.logquant import LogQuantizer
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import assert_eval_ready, set_quant_mode
from carsam.testbed.shipped import TESTBED_CHECKPOINT
from tests.helpers import decode_box, experiment, real_data_overrides


@pytest.fixture(scope="module")
def quantized_testbed(random_testbed_checkpoint):
    """An RTN-calibrated W4A4 testbed with the structure changes methods make: an AGQ log quantizer (tau 4),
    an LSQ-learned scale, a weight changed in place (its FP reference kept), and one calibration image."""
    torch.manual_seed(0)
    sam = build_model("testbed", random_testbed_checkpoint)
    quantize_(sam, QuantConfig())
    calibrate_weights_(sam)
    image = torch.randn(1, 3, sam.image_encoder.img_size, sam.image_encoder.img_size)
    set_quant_mode(sam, QuantMode.CALIBRATE)
    decode_box(sam, image)
    set_quant_mode(sam, QuantMode.QUANTIZED)
    attention = sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    attention.pv_matmul.lhs_quantizer = LogQuantizer(4, tau=4, scale=1.0)
    attention.pv_matmul.lhs_quantizer.mode = QuantMode.QUANTIZED
    lsq = attention.qk_matmul.lhs_quantizer
    lsq.make_scale_learnable().data.mul_(1.25)
    with torch.no_grad():
        attention.q_proj.weight.add_(0.01)
    sam.eval()
    assert_eval_ready(sam)
    return sam, image


def _config(tmp_path, small_coco, checkpoint, name: str, *overrides: str):
    return resolve(experiment(name), [f"runs_dir={tmp_path}", f"model.checkpoint={checkpoint}", "data.calib_size=2",
                                      "data.max_val_images=3", "recon.iters=2", "recon.interference_images=1",
                                      "diagnostics.images=1", *real_data_overrides(small_coco), *overrides])


@pytest.fixture(scope="module")
def carsam_run(tmp_path_factory, small_coco, random_testbed_checkpoint) -> Path:
    """A CAR-SAM W4A4 run (MAC, JCAR, AdaRound bake, AGQ) on the small set, its model saved by default."""
    runs = tmp_path_factory.mktemp("runs")
    record = pipeline.run(_config(runs, small_coco, random_testbed_checkpoint, "carsam_w4a4.yaml"))
    assert record.status == "completed" and "saved_model" in record.details
    return runs / record.run_id



@pytest.fixture(scope="module")
def trained_carsam_run(tmp_path_factory, small_coco) -> Path:
    """The same run on the shipped (trained) testbed, whose mask logits are mostly far from the threshold, as a
    real model's are (a random model's sit near it, so any last-bit difference flips pixels)."""
    runs = tmp_path_factory.mktemp("trained_runs")
    record = pipeline.run(_config(runs, small_coco, TESTBED_CHECKPOINT, "carsam_w4a4.yaml", "recon.iters=10",
                                  "diagnostics.enabled=false"))
    assert record.status == "completed"
    return runs / record.run_id


@pytest.fixture(scope="module")
def trained_rtn_w6a6_run(tmp_path_factory, small_coco) -> Path:
    """RTN W6A6 on the shipped testbed, model saved: 6-bit grids in 8-bit Q/DQ types."""
    runs = tmp_path_factory.mktemp("w6_runs")
    record = pipeline.run(_config(runs, small_coco, TESTBED_CHECKPOINT, "rtn_w6a6.yaml", "output.save_model=true",
                                  "diagnostics.enabled=false"))
    assert record.status == "completed"
    return runs / record.run_id

"""Pipeline guarantees: what records say, which data calibrates, and no run evaluates a model left
in a calibration or FP mode."""

from __future__ import annotations

import pytest

from carsam import pipeline
from carsam.config import resolve
from carsam.methods.registry import _REGISTRY, Method, register
from carsam.models.quantize import quantize_
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import set_quant_mode
from tests.helpers import experiment, real_data_overrides


def _config(tmp_path, small_coco, checkpoint, name: str, *overrides: str):
    return resolve(experiment(name), [f"runs_dir={tmp_path}", f"model.checkpoint={checkpoint}",
                                      "data.calib_size=2", *real_data_overrides(small_coco), *overrides])


def test_fp_records_say_32_bits(tmp_path, small_coco, random_testbed_checkpoint):
    record = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, "fp.yaml"))
    assert (record.w_bits, record.a_bits) == (32, 32)


def test_records_carry_the_thread_count_that_computed_them(tmp_path, small_coco, random_testbed_checkpoint):
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        record = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, "fp.yaml"))
    finally:
        torch.set_num_threads(threads)
    assert record.details["torch_threads"] == 1


def test_rtn_records_carry_the_configured_bits(tmp_path, small_coco, random_testbed_checkpoint):
    record = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, "rtn_w8a8.yaml",
                                  "quant.a_bits=6", "quant.w_observer=minmax"))
    assert (record.w_bits, record.a_bits, record.status) == (8, 6, "completed")


def test_seed_changes_the_calibration_subset_but_never_the_evaluation_set(small_coco, random_testbed_checkpoint,
                                                                         tmp_path):
    def sets(seed: int):
        cfg = _config(tmp_path, small_coco, random_testbed_checkpoint, "fp.yaml", "data.max_val_images=3")
        data = pipeline.load_datasets(cfg.data, seed)
        return data.calib.image_ids, data.val.image_ids

    (calib0, val0), (calib1, val1) = sets(0), sets(1)
    assert val0 == val1 and calib0 != calib1


def test_a_method_leaving_quantizers_in_calibrate_mode_cannot_be_evaluated(tmp_path, small_coco,
                                                                        random_testbed_checkpoint):
    def leaky(sam, calib, config, context):
        quantize_(sam, config.quant)
        set_quant_mode(sam, QuantMode.CALIBRATE)
        return {}

    register(Method("leaky_test_method", leaky))
    try:
        config = _config(tmp_path, small_coco, random_testbed_checkpoint, "rtn_w8a8.yaml",
                         "method=leaky_test_method")
        with pytest.raises(AssertionError, match="mode=calibrate"):
            pipeline.run(config)
    finally:
        _REGISTRY.pop("leaky_test_method")


def test_a_quantizer_left_stochastic_cannot_be_evaluated(tmp_path, small_coco, random_testbed_checkpoint):
    from carsam.methods.calibrate import quantize_calibrate_
    from carsam.quant.state import set_quant_prob
    from carsam.run_context import RunContext

    def half_dropped(sam, calib, config, context):
        details = quantize_calibrate_(sam, calib, config, RunContext())
        set_quant_prob(sam, 0.5)  # QDrop's training-time setting, as PTQ4SAM's code left it
        return details

    register(Method("dropped_test_method", half_dropped))
    try:
        config = _config(tmp_path, small_coco, random_testbed_checkpoint, "rtn_w8a8.yaml",
                         "method=dropped_test_method", "quant.w_observer=minmax")
        with pytest.raises(AssertionError, match="quant_prob=0.5"):
            pipeline.run(config)
    finally:
        _REGISTRY.pop("dropped_test_method")

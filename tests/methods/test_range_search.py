"""The range-search baselines `omse` and `percentile`: registered, runnable end to end, recording the
observers they used, and never choosing an activation range wider than min-max's."""

from __future__ import annotations

import pytest
import torch

from carsam import pipeline
from carsam.config import resolve
from carsam.methods.range_search import ACT_PERCENTILE, with_observers
from carsam.methods.registry import get_method, method_names
from carsam.models.quantize import QuantConfig
from carsam.models.sam import build_model
from carsam.quant.quantizers import UniformQuantizer, iter_quantizers
from carsam.run_context import RunContext
from tests.helpers import experiment, real_data_overrides

EXPECTED = {"omse": ("mse", "mse"), "percentile": ("mse", "percentile")}


def _config(tmp_path, small_coco, checkpoint, name: str, *overrides: str):
    return resolve(experiment(name), [f"runs_dir={tmp_path}", f"model.checkpoint={checkpoint}",
                                      "data.calib_size=2", "data.max_val_images=2",
                                      *real_data_overrides(small_coco), *overrides])


def _act_scales(config) -> dict[str, torch.Tensor]:
    """Apply `config.method` to a fresh model on the config's calibration set; the per-tensor scales."""
    sam = build_model(config.model.type, config.model.checkpoint)
    calib = pipeline.load_datasets(config.data, config.seed).calib
    get_method(config.method).apply(sam, calib, config, RunContext())
    return {path: q.scale.clone() for path, q in iter_quantizers(sam)
            if isinstance(q, UniformQuantizer) and q.ch_axis is None}


@pytest.fixture(scope="module")
def minmax_scales(tmp_path_factory, small_coco, random_testbed_checkpoint) -> dict[str, torch.Tensor]:
    """Activation scales of RTN W4A4 (min-max activations) on the random testbed."""
    config = _config(tmp_path_factory.mktemp("rtn"), small_coco, random_testbed_checkpoint, "rtn_w4a4.yaml",
                     "quant.a_observer=minmax")
    return _act_scales(config)


def test_registry_lists_both_methods() -> None:
    assert {"omse", "percentile"} <= set(method_names())
    assert get_method("omse").quantized and get_method("percentile").quantized


def test_with_observers_replaces_the_observers_and_keeps_other_overrides() -> None:
    quant = QuantConfig(a_observer="minmax", overrides=(("a.*", {"a_observer": "minmax", "a_bits": 8}),
                                                        ("b.*", {"w_observer": "minmax"})))
    out = with_observers(quant, "mse", "percentile")
    assert (out.w_observer, out.a_observer) == ("mse", "percentile")
    assert out.overrides == (("a.*", {"a_bits": 8}),)


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_run_completes_and_records_the_observers_used(tmp_path, small_coco, random_testbed_checkpoint,
                                                      method) -> None:
    # the configured observers (rtn's defaults, overridden here on purpose) are replaced by the method's
    config = _config(tmp_path, small_coco, random_testbed_checkpoint, f"{method}_w4a4.yaml",
                     "quant.w_observer=minmax", "quant.a_observer=minmax")
    record = pipeline.run(config)
    assert record.status == "completed", record.error
    w_obs, a_obs = EXPECTED[method]
    details = record.details
    assert (details["w_observer"], details["a_observer"]) == (w_obs, a_obs)
    used = details["observers_used"]
    assert set(used["weight"]) == {w_obs} and set(used["activation"]) == {a_obs}
    assert sum(used["weight"].values()) + sum(used["activation"].values()) == details["num_quantizers"]
    if method == "percentile":
        assert details["act_percentile"] == ACT_PERCENTILE
    else:
        assert "act_percentile" not in details


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_activation_ranges_are_never_wider_than_minmax(tmp_path, small_coco, random_testbed_checkpoint,
                                                       minmax_scales, method) -> None:
    scales = _act_scales(_config(tmp_path, small_coco, random_testbed_checkpoint, f"{method}_w4a4.yaml"))
    assert scales.keys() == minmax_scales.keys() and scales
    for path, scale in scales.items():
        assert scale <= minmax_scales[path] * (1 + 1e-5), path
    # and the search is not a no-op: some ranges are clipped below min-max's
    assert any(scale < 0.999 * minmax_scales[path] for path, scale in scales.items())

"""The real-SAM path: a vit_b checkpoint on disk, COCO-format data on disk, SAM's 1024 input."""

from __future__ import annotations

import math

import pytest
import torch
from segment_anything import sam_model_registry

from carsam.cli import main
from carsam.record import list_records
from tests.helpers import experiment, real_data_overrides


@pytest.fixture(scope="module")
def random_vit_b_checkpoint(tmp_path_factory):
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    torch.random.set_rng_state(state)
    path = tmp_path_factory.mktemp("vit_b") / "sam_vit_b_random.pth"
    torch.save(sam.state_dict(), path)
    return path


@pytest.mark.slow
def test_rtn_runs_on_random_vit_b_at_1024(tmp_path, small_coco, random_vit_b_checkpoint, capsys):
    args = ["run", "--no-progress", experiment("rtn_w8a8.yaml"), f"runs_dir={tmp_path}", "model.type=vit_b",
            f"model.checkpoint={random_vit_b_checkpoint}", "quant.w_observer=minmax", "data.calib_size=1",
            "data.max_val_images=1", *real_data_overrides(small_coco)]
    assert main(args) == 0, capsys.readouterr().err
    (record,) = list_records(tmp_path)
    assert record["status"] == "completed" and record["model"]["type"] == "vit_b"
    assert record["details"]["num_quantizers"] > 100  # 12 encoder + 7 decoder attentions, MLPs, neck
    evals = {k: v for k, v in record["metrics"].items() if k.startswith("eval/")}
    assert len(evals) == 5 and all(0.0 <= v <= 1.0 for v in evals.values())
    assert record["metrics"]["diag/entropy_fp_t2i"] > 0.0 and math.isfinite(record["metrics"]["diag/kl_t2i"])


@pytest.fixture(scope="module")
def random_sam2_t_checkpoint(tmp_path_factory):
    """sam2_t's random initialisation in the official checkpoint layout (`{"model": SAM2Base state dict}`)."""
    from carsam.models.sam2_build import build_sam2_base

    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    base = build_sam2_base("sam2_t")
    torch.random.set_rng_state(state)
    path = tmp_path_factory.mktemp("sam2_t") / "sam2.1_hiera_tiny_random.pt"
    torch.save({"model": base.state_dict()}, path)
    return path


@pytest.mark.slow
def test_rtn_runs_on_random_sam2_t_at_1024(tmp_path, small_coco, random_sam2_t_checkpoint, capsys):
    args = ["run", "--no-progress", experiment("rtn_w8a8.yaml"), f"runs_dir={tmp_path}", "model.type=sam2_t",
            f"model.checkpoint={random_sam2_t_checkpoint}", "quant.w_observer=minmax", "data.calib_size=1",
            "data.max_val_images=1", "model.sam2_stability_fallback=false", *real_data_overrides(small_coco)]
    assert main(args) == 0, capsys.readouterr().err
    (record,) = list_records(tmp_path)
    assert record["status"] == "completed" and record["model"]["type"] == "sam2_t"
    assert record["config"]["model"]["sam2_stability_fallback"] is False  # recorded as run
    assert record["details"]["num_quantizers"] > 200  # 12 Hiera + 7 decoder attentions, MLPs, neck convs
    evals = {k: v for k, v in record["metrics"].items() if k.startswith("eval/")}
    assert len(evals) == 5 and all(0.0 <= v <= 1.0 for v in evals.values())
    assert record["metrics"]["diag/entropy_fp_t2i"] > 0.0 and math.isfinite(record["metrics"]["diag/kl_t2i"])

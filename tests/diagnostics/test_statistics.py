"""`carsam stats`: the accumulators against pooled reference math, the collection against hooks on the plain
FP model, and the command's files and errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from carsam.cli import main
from carsam.data.coco import CocoBoxPrompts
from carsam.diagnostics.statistics import (
    OUTLIER_FACTOR,
    ChannelAbsMax,
    ChannelMoments,
    ProbMeter,
    RangeMeter,
    collect_statistics,
)
from carsam.eval.inference import SamBoxPredictor, run_image
from carsam.methods.big import bimodality_coefficient
from carsam.models.quantize import QuantConfig, quantize_
from carsam.report.statistics import STATS_FILES, decoder_summary, encoder_summary
from carsam.testbed.spec import build_testbed_from_checkpoint
from tests.helpers import experiment, real_data_overrides


def _chunks(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    bimodal = torch.cat([torch.randn(300, 3, generator=gen) - 3, torch.randn(300, 3, generator=gen) + 3])
    normal = torch.randn(600, 2, generator=gen)
    data = torch.cat([bimodal, normal], dim=1)[torch.randperm(600, generator=gen)]
    return list(data.split([100, 250, 250]))  # uneven calls


def test_range_meter_equals_the_pooled_statistics_whatever_the_calls() -> None:
    chunks, meter = _chunks(), RangeMeter()
    for chunk in chunks:
        meter.add(chunk)
    pooled = torch.cat(chunks).double()
    rms = float(pooled.square().mean().sqrt())
    stats = meter.stats()
    assert stats["min"] == float(pooled.min()) and stats["max"] == float(pooled.max())
    assert stats["rms"] == pytest.approx(rms, rel=1e-12)
    assert stats["absmax_rms"] == pytest.approx(float(pooled.abs().max()) / rms, rel=1e-12)


def test_channel_bimodality_equals_bigs_coefficient_on_each_pooled_channel() -> None:
    chunks, moments = _chunks(), ChannelMoments()
    for chunk in chunks:
        moments.add(chunk)
    pooled = torch.cat(chunks)
    expected = torch.tensor([bimodality_coefficient(pooled[:, c]) for c in range(pooled.shape[1])], dtype=torch.float64)
    got = moments.bimodality()
    assert torch.allclose(got, expected, rtol=1e-9, atol=0)
    assert bool((got[:3] > 5 / 9).all()) and bool((got[3:] < 5 / 9).all())  # two clusters vs one normal (BC 1/3)


def test_outlier_ratio_and_channels_of_a_known_activation() -> None:
    x = torch.ones(2, 5, 8)
    x[..., 0] = -50.0  # one channel 50x the others (by magnitude)
    x[1, 0, 1] = 5.0  # a channel 5x the others: not an outlier at the factor of 10
    meter = ChannelAbsMax()
    meter.add(x[:1])
    meter.add(x[1:])
    stats = meter.stats()
    assert OUTLIER_FACTOR == 10.0
    assert stats["outlier_ratio"] == 50.0 and stats["outlier_channels"] == 1.0 and stats["channels"] == 8.0


def test_probability_shares_count_values_below_one_and_half_a_4bit_step() -> None:
    meter = ProbMeter()
    meter.add(torch.tensor([0.0, 0.02, 0.05, 0.1, 0.83]))  # 1/30 = 0.0333, 1/15 = 0.0667
    assert meter.stats() == {"below_4bit_step": 3 / 5, "zero_4bit": 2 / 5}


@pytest.fixture(scope="module")
def val_set(small_coco) -> CocoBoxPrompts:
    return CocoBoxPrompts(small_coco["images"], small_coco["annotations"], None, prompt_source="gt_boxes")


def test_collection_measures_the_fp_model_through_its_twins(random_testbed_checkpoint, val_set) -> None:
    """The twins' statistics equal those hooked on the plain model: a token->image attention's token and image
    inputs (q_in, k_in) and an encoder block's LayerNorm output, over the same two images."""
    plain = build_testbed_from_checkpoint(random_testbed_checkpoint).eval()
    ids = val_set.image_ids[:2]
    seen: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "norm": []}
    t2i = plain.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    t2i.register_forward_pre_hook(lambda m, a, kw: (seen["q"].append(kw["q"]), seen["k"].append(kw["k"])) and None,
                                  with_kwargs=True)
    plain.image_encoder.blocks[1].norm2.register_forward_hook(lambda m, a, out: seen["norm"].append(out))
    with torch.no_grad():
        predictor = SamBoxPredictor(plain)
        for image_id in ids:
            run_image(predictor, val_set, image_id)
    twin = quantize_(build_testbed_from_checkpoint(random_testbed_checkpoint), QuantConfig())
    frame = collect_statistics(twin, val_set, ids)
    cell = frame.set_index(["path", "tensor", "stat"])["value"]
    site = "mask_decoder.transformer.layers.0.cross_attn_token_to_image"
    for name, key in (("q_in", "q"), ("k_in", "k")):
        pooled = torch.cat([x.flatten() for x in seen[key]])
        assert cell[(site, name, "min")] == float(pooled.min()) and cell[(site, name, "max")] == float(pooled.max())
    norm = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen["norm"]]).abs().amax(0).double()
    assert cell[("image_encoder.blocks.1", "norm2", "outlier_ratio")] == pytest.approx(
        float(norm.max() / norm.median()), rel=1e-12)
    assert len(decoder_summary(frame)) == 7 and len(encoder_summary(frame)) == len(twin.image_encoder.blocks)


def test_stats_command_writes_its_files_and_names_bad_input(capsys, tmp_path, small_coco,
                                                            random_testbed_checkpoint) -> None:
    args = [experiment("fp.yaml"), f"model.checkpoint={random_testbed_checkpoint}", "data.prompt_source=gt_boxes",
            *real_data_overrides(small_coco), "--images", "2", "--out", str(tmp_path / "stats")]
    assert main(["stats", *args]) == 0
    files = {name: tmp_path / "stats" / file for name, file in STATS_FILES.items()}
    assert all(path.is_file() for path in files.values())
    record = json.loads(files["record"].read_text())
    assert len(record["images"]) == 2 and record["model"]["sha256"] and record["data"]["sha256"]
    assert set(pd.read_parquet(files["frame"])["scope"]) == {"decoder", "encoder"}
    assert "### Decoder attentions" in capsys.readouterr().out
    assert main(["stats", *args[:-2], "--random-init", "vit_q", "--out", str(tmp_path / "bad")]) == 2
    assert "--random-init must be" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_random_init_reference_is_seeded(tmp_path, small_coco) -> None:
    args = [experiment("fp.yaml"), "data.prompt_source=gt_boxes", *real_data_overrides(small_coco), "--images", "1",
            "--random-init", "testbed"]
    frames = []
    for name in ("a", "b"):
        assert main(["stats", *args, "--out", str(tmp_path / name)]) == 0
        frames.append(pd.read_parquet(tmp_path / name / STATS_FILES["frame"]))
    assert np.array_equal(frames[0]["value"].to_numpy(), frames[1]["value"].to_numpy())
    record = json.loads((tmp_path / "a" / STATS_FILES["record"]).read_text())
    assert record["model"] == {"type": "testbed", "checkpoint": "random initialisation (seed 0)", "sha256": None}

"""The attention-statistics collector on the random testbed: FP == FP exactly, W4A4 dissipates."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from segment_anything.utils.transforms import ResizeLongestSide

from carsam.data.coco import CocoBoxPrompts
from carsam.diagnostics.collector import (
    ENCODER_ATTN,
    IMAGE_TO_TOKEN,
    SELF_ATTN,
    TOKEN_TO_IMAGE,
    collect_attention_stats,
    match_prompts,
    prompt_mask_tokens,
)
from carsam.models.quantize import QuantConfig, quantize_
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import quant_modes, quant_modes_set
from carsam.testbed.spec import build_testbed_from_checkpoint

BOTH = ("decoder", "encoder")


@pytest.fixture(scope="module")
def stats(w4a4, val) -> dict[str, object]:
    image_ids = val.image_ids[:2]
    with quant_modes_set(w4a4, QuantMode.FP):
        fp = collect_attention_stats(w4a4, val, image_ids, scopes=BOTH)
    return {"fp": fp, "q": collect_attention_stats(w4a4, val, image_ids, scopes=BOTH)}


def test_gap_and_kl_are_exactly_zero_when_every_quantizer_is_fp(stats):
    fp = stats["fp"]
    assert (fp.loc[fp["kind"].isin(["entropy_gap", "kl", "mask_mass_gap"]), "value"] == 0.0).all()


def test_w4a4_changes_the_attention(stats):
    q = stats["q"]
    for module in (SELF_ATTN, TOKEN_TO_IMAGE, IMAGE_TO_TOKEN, ENCODER_ATTN):
        rows = q[q["module"] == module]
        assert (rows.loc[rows["kind"] == "entropy_gap", "value"].abs() > 0).any(), module
        assert (rows.loc[rows["kind"] == "kl", "value"] > 0).all(), module


def test_one_row_per_attention_head_and_kind(stats, w4a4):
    q = stats["q"]
    decoder_heads, encoder_heads = 8, w4a4.image_encoder.blocks[0].attn.num_heads
    t2i = q[q["module"] == TOKEN_TO_IMAGE]
    assert sorted(t2i["layer"].unique()) == [0, 1, 2]  # two layers, then the final attention
    assert set(t2i["kind"]) == {"entropy_fp", "entropy_q", "entropy_gap", "kl",
                                "mask_mass_fp", "mask_mass_q", "mask_mass_gap"}
    assert len(t2i) == 3 * decoder_heads * 7
    assert set(q.loc[q["module"] == IMAGE_TO_TOKEN, "kind"]) == {"entropy_fp", "entropy_q", "entropy_gap", "kl"}
    assert len(q[q["module"] == ENCODER_ATTN]) == len(w4a4.image_encoder.blocks) * encoder_heads * 4
    assert (q["step"] == 0).all() and not q[["module", "layer", "head", "kind"]].duplicated().any()
    for kind in ("entropy_fp", "entropy_q", "mask_mass_fp", "mask_mass_q"):
        assert q.loc[q["kind"] == kind, "value"].between(0.0, 1.0).all()


def test_fp_statistics_do_not_depend_on_the_quantizers(stats):
    fp_pass_of_q_run = stats["q"].set_index(["module", "layer", "head", "kind"])["value"]
    fp_run = stats["fp"].set_index(["module", "layer", "head", "kind"])["value"]
    for kind in ("entropy_fp", "mask_mass_fp"):
        assert np.allclose(fp_pass_of_q_run.xs(kind, level="kind"), fp_run.xs(kind, level="kind"), atol=1e-6)


def test_collector_leaves_modes_hooks_and_train_flag_as_they_were(w4a4, val):
    sam = copy.deepcopy(w4a4).train()
    before = quant_modes(sam)
    collect_attention_stats(sam, val, val.image_ids[:1])
    assert quant_modes(sam) == before and sam.training
    assert not any(m._forward_pre_hooks for m in sam.modules())


def test_plain_attentions_are_refused(random_testbed_checkpoint, val):
    sam = build_testbed_from_checkpoint(random_testbed_checkpoint)
    with pytest.raises(TypeError, match="quantize_"):
        collect_attention_stats(sam, val, val.image_ids[:1])
    decoder_only = quantize_(build_testbed_from_checkpoint(random_testbed_checkpoint),
                             QuantConfig(quantize_encoder=False))
    with pytest.raises(TypeError, match="image_encoder.blocks.0.attn"):
        collect_attention_stats(decoder_only, val, val.image_ids[:1], scopes=BOTH)


def test_bad_arguments_raise(w4a4, val):
    with pytest.raises(ValueError, match="scopes"):
        collect_attention_stats(w4a4, val, val.image_ids[:1], scopes=("neck",))
    with pytest.raises(ValueError, match="not in the dataset"):
        collect_attention_stats(w4a4, val, [123456789])


def test_detector_prompts_match_their_annotation_by_box_iou():
    gt = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], dtype=np.float32)
    prompts = np.array([[21, 19, 41, 40], [0, 0, 9, 10], [50, 50, 60, 60], [0, 0, 10, 10]], dtype=np.float32)
    index = match_prompts(prompts, np.array([2, 1, 1, 2]), gt, np.array([1, 2]))
    assert index.tolist() == [1, 0, -1, -1]  # the last box has the right place but the wrong category


def test_gt_box_prompts_are_their_own_annotations(small_coco):
    gt_set = CocoBoxPrompts(small_coco["images"], small_coco["annotations"], None, prompt_source="gt_boxes")
    image_id = next(i for i in gt_set.image_ids if len(gt_set.prompts(i)[0]))
    height, width = gt_set.image_size(image_id)
    input_size = ResizeLongestSide.get_preprocess_shape(height, width, 128)
    weights, valid = prompt_mask_tokens(gt_set, image_id, input_size, img_size=128, grid=16)
    _, masks, _ = gt_set.ground_truth(image_id)
    assert valid.all() and weights.shape == (len(masks), 256)
    # a token covers 8x8 input pixels; the mask's area scales with the resize
    area_in_input = masks.sum(axis=(1, 2)) * (input_size[0] * input_size[1]) / (height * width)
    assert np.allclose(weights.sum(dim=1).numpy() * 64, area_in_input, rtol=0.02)

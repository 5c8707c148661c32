"""Unit groupings: found by type, expected counts and paths, for FP and quantized models."""

from __future__ import annotations

import pytest
import torch

from carsam.recon.units import GROUPINGS, find_units
from carsam.testbed.spec import build_testbed_sam

T = "mask_decoder.transformer"
ATTENTION_MLP = [f"{T}.layers.{i}.{n}" for i in range(2)
                 for n in ("self_attn", "cross_attn_token_to_image", "mlp", "cross_attn_image_to_token")]
ATTENTION_MLP.append(f"{T}.final_attn_token_to_image")


@pytest.fixture(scope="module")
def fp_sam():
    torch.manual_seed(0)
    return build_testbed_sam()


def test_attention_mlp_has_nine_decoder_units_in_call_order(fp_sam, qsam):
    for sam in (fp_sam, qsam):
        units = find_units(sam, "attention_mlp")
        assert [u.path for u in units] == ATTENTION_MLP
        assert [u.kind for u in units] == ["attention", "attention", "mlp", "attention"] * 2 + ["attention"]
        assert all(u.streams == ("out",) for u in units)


def test_block_grouping_has_two_blocks_with_two_streams_and_the_final_attention(qsam):
    units = find_units(qsam, "block")
    assert [u.path for u in units] == [f"{T}.layers.0", f"{T}.layers.1", f"{T}.final_attn_token_to_image"]
    assert [u.streams for u in units] == [("queries", "keys")] * 2 + [("out",)]
    assert units[0].name == "decoder.layers.0"


def test_encoder_block_grouping_finds_every_encoder_block(fp_sam):
    units = find_units(fp_sam, "encoder_block")
    assert [u.path for u in units] == [f"image_encoder.blocks.{i}" for i in range(4)]
    assert all(u.in_encoder for u in units) and not find_units(fp_sam, "block")[0].in_encoder


def test_unit_module_is_the_model_submodule(qsam):
    unit = find_units(qsam, "attention_mlp")[1]
    assert unit.module(qsam) is qsam.mask_decoder.transformer.layers[0].cross_attn_token_to_image


def test_unknown_grouping_lists_valid_names(fp_sam):
    with pytest.raises(ValueError, match="attention_mlp"):
        find_units(fp_sam, "pairs")
    assert set(GROUPINGS) == {"attention_mlp", "block", "pair", "chain", "decoder", "encoder_block"}


def test_config_choices_are_the_groupings_units_can_build():
    from carsam.config import JCAR_GROUPINGS, RECON_ENCODER_GROUPINGS, RECON_GROUPINGS
    from carsam.recon.units import GROUPINGS

    assert set(GROUPINGS) == set(RECON_GROUPINGS) | (set(RECON_ENCODER_GROUPINGS) - {"none"})
    assert set(JCAR_GROUPINGS) <= set(RECON_GROUPINGS)

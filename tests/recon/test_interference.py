"""Boundary errors (cross-branch interference): zero in FP, positive at W4A4, recorded per decoder unit."""

from __future__ import annotations

import pytest
import torch

from carsam.config import JcarConfig, ReconConfig
from carsam.methods.jcar import jcar_settings_for
from carsam.quant.fp_reference import SUFFIX, remember_fp_
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import quant_modes, quant_modes_set
from carsam.recon.driver import UnitRecipe, reconstruct_model_
from carsam.recon.interference import FpTraces, boundary_errors, paired_errors
from carsam.recon.spans import step_names
from carsam.recon.stage import ReconSettings
from carsam.recon.units import find_units

KEYS_UNTOUCHED = ("layers.0.self_attn", "layers.0.cross_attn_token_to_image", "layers.0.mlp")


def test_boundary_errors_are_zero_when_every_quantizer_is_fp(qsam, calib2):
    with quant_modes_set(qsam, QuantMode.FP):
        errors = boundary_errors(qsam, calib2, max_images=2)
    assert list(errors) == step_names(qsam.mask_decoder.transformer)
    assert all(e == {"queries": 0.0, "keys": 0.0} for e in errors.values())


def test_boundary_errors_are_positive_at_w4a4_where_the_stream_was_touched(qsam, calib2):
    errors = boundary_errors(qsam, calib2, max_images=2)
    assert all(e["queries"] > 0.0 for e in errors.values())
    # the encoder is FP here: the keys differ only once an image->token attention has written them
    assert all(errors[step]["keys"] == 0.0 for step in KEYS_UNTOUCHED)
    assert all(e["keys"] > 0.0 for step, e in errors.items() if step not in KEYS_UNTOUCHED)


def test_boundary_errors_average_the_images(qsam, calib2):
    first = boundary_errors(qsam, calib2, max_images=1)
    both = boundary_errors(qsam, calib2, max_images=2)
    assert first != both and set(first) == set(both)
    with pytest.raises(ValueError, match="max_images"):
        boundary_errors(qsam, calib2, max_images=0)


def test_paired_errors_of_identical_inputs_count_every_element(qsam):
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 256, 16, 16, generator=gen), torch.randn(2, 256, 16, 16, generator=gen),
              torch.randn(2, 7, 256, generator=gen))
    with torch.no_grad():
        errors = paired_errors(qsam.mask_decoder.transformer, inputs, inputs)
    assert errors["layers.0.mlp"]["queries"][1] == 2 * 7 * 256 and errors["layers.0.mlp"]["keys"][1] == 2 * 256 * 256
    assert errors["layers.0.mlp"]["keys"][0] == 0.0 and errors["layers.0.mlp"]["queries"][0] > 0.0


def test_boundary_errors_leave_no_state_behind(qsam, calib2):
    qsam.train()
    before = quant_modes(qsam)
    boundary_errors(qsam, calib2, max_images=1)
    transformer = qsam.mask_decoder.transformer
    assert quant_modes(qsam) == before and qsam.training and transformer.training
    assert not transformer._forward_pre_hooks and not transformer._forward_hooks


def test_reconstruction_records_interference_before_and_after_each_decoder_unit(qsam, calib2):
    units = find_units(qsam, "chain")[2:4]  # layers.0.mlp, then the layers.0 chain span
    recon = ReconConfig(iters=4)
    jcar = JcarConfig(enabled=True, variance_weighting=True)
    settings_for = jcar_settings_for(ReconSettings.from_config(recon), jcar)
    record = reconstruct_model_(qsam, calib2, recon, UnitRecipe(), units=units, settings_for=settings_for,
                                track_interference=True, interference_images=1).record()
    entries = record["interference"]
    assert [e["after"] for e in entries] == ["start", "decoder.layers.0.mlp", "decoder.layers.0.chain"]
    names = step_names(qsam.mask_decoder.transformer)
    assert all(list(e["errors"]) == names for e in entries)
    assert entries[0]["errors"] != entries[1]["errors"]  # the MLP's rounding changed
    assert entries[0]["errors"]["layers.0.cross_attn_token_to_image"] == \
        entries[2]["errors"]["layers.0.cross_attn_token_to_image"]  # upstream of both units: unchanged
    weights = dict(record["units"][1]["stage"]["stream_weights"])
    assert set(weights) == {"queries", "keys"} and record["units"][0]["stage"]["reduction"] == "qdrop"


def test_kept_fp_traces_give_the_errors_of_fresh_ones_after_the_quantized_model_changes(qsam, calib2):
    """`FpTraces` (one per reconstruction): the FP side is decoded once; changing the quantized model (here
    a weight changed in place with its FP reference kept, as MAC and baked AdaRound do) changes the
    errors but not the FP side, so kept and fresh traces agree exactly."""
    kept = FpTraces()
    before = boundary_errors(qsam, calib2, max_images=2, fp_traces=kept)
    assert set(kept.kept) == set(calib2.image_ids[:2]) and kept.nbytes > 0
    state = [s for calls in kept.kept.values() for trace in calls for _, s in trace]
    assert kept.nbytes == sum(t.numel() * t.element_size() for s in state for t in s)  # the estimate is exact
    proj = qsam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.q_proj
    original = proj.weight.detach().clone()
    remember_fp_(proj, "weight")
    try:
        with torch.no_grad():
            proj.weight.mul_(1.5)
        changed = boundary_errors(qsam, calib2, max_images=2, fp_traces=kept)
        fresh = boundary_errors(qsam, calib2, max_images=2)
    finally:
        with torch.no_grad():
            proj.weight.copy_(original)
        del proj._buffers["weight" + SUFFIX]
    assert changed == fresh and changed != before


def test_fp_traces_beyond_the_budget_are_traced_afresh(qsam, calib2):
    none_kept = FpTraces(budget_bytes=0)
    assert boundary_errors(qsam, calib2, max_images=2, fp_traces=none_kept) == boundary_errors(qsam, calib2, 2)
    assert none_kept.kept == {} and none_kept.nbytes == 0

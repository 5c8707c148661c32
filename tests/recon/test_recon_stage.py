"""The reconstruction stage: lowers a W4 unit's loss from RTN, Lightning == plain loop, no leaked state."""

from __future__ import annotations

import copy

import pytest
import torch

from carsam.config import ReconConfig
from carsam.quant.adaround import enable_adaround_, set_soft_rounding
from carsam.quant.modules import quantized_weight_modules
from carsam.quant.quantizers import QuantMode, UniformQuantizer
from carsam.quant.state import set_quant_prob
from carsam.recon.block_io import block_io_loss, capture_block_io
from carsam.recon.stage import ReconSettings, ReconstructionStage, reconstruct_unit, reconstruct_unit_plain
from carsam.recon.units import find_units


def _weights_only(module) -> None:
    """Activations of `module` in FP: only its 4-bit weights are quantized."""
    weight_qs = {id(layer.weight_quantizer) for _, layer in quantized_weight_modules(module)}
    for m in module.modules():
        if isinstance(m, UniformQuantizer) and id(m) not in weight_qs:
            m.mode = QuantMode.FP


def _enable_adaround(module) -> None:
    for _, layer in quantized_weight_modules(module):
        enable_adaround_(layer)


def test_adaround_reconstruction_lowers_w4_unit_loss_from_rtn(qsam, calib2):
    unit = find_units(qsam, "attention_mlp")[1]
    module = unit.module(qsam)
    _weights_only(module)
    block_io = capture_block_io(qsam, unit, calib2)
    rtn = block_io_loss(qsam, block_io)
    _enable_adaround(module)
    settings = ReconSettings.from_config(ReconConfig(iters=60, alpha_lr=1e-2), reduction="mean")
    result = reconstruct_unit_plain(qsam, unit, block_io, settings)
    set_soft_rounding(module, False)
    assert len(result.curve["out"]) == 60
    assert block_io_loss(qsam, block_io) < 0.9 * rtn


def _qdrop_unit(sam):
    unit = find_units(sam, "attention_mlp")[1]
    module = unit.module(sam)
    _enable_adaround(module)
    for m in module.modules():
        if isinstance(m, UniformQuantizer) and m.ch_axis is None:
            m.make_scale_learnable()
    set_quant_prob(module, 0.5)
    return unit


def test_lightning_stage_and_plain_loop_give_the_same_loss_curve(qsam, calib2):
    unit = find_units(qsam, "attention_mlp")[1]
    block_io = capture_block_io(qsam, unit, calib2, inputs="quantized")
    other = copy.deepcopy(qsam)
    settings = ReconSettings.from_config(ReconConfig(iters=12, warmup=0.25))
    light = reconstruct_unit(qsam, _qdrop_unit(qsam), block_io, settings)
    plain = reconstruct_unit_plain(other, _qdrop_unit(other), block_io, settings)
    assert set(light.curve) == {"out", "round", "total"} and light.steps == plain.steps == 12
    for key in light.curve:
        assert light.curve[key] == pytest.approx(plain.curve[key], rel=1e-5, abs=1e-8)
    assert light.curve["round"][:3] == [0.0, 0.0, 0.0] and light.curve["round"][3] > 0
    a, b = unit.module(qsam), unit.module(other)
    assert torch.allclose(a.q_proj.weight_quantizer.alpha, b.q_proj.weight_quantizer.alpha, atol=1e-6)


def test_stage_leaves_no_state_behind(qsam, calib2):
    unit = _qdrop_unit(qsam)
    module = unit.module(qsam)
    block_io = capture_block_io(qsam, unit, calib2)
    flags = {name: p.requires_grad for name, p in qsam.named_parameters()}
    rng = torch.random.get_rng_state()
    qsam.eval()
    reconstruct_unit(qsam, unit, block_io, ReconSettings.from_config(ReconConfig(iters=3)))
    assert {name: p.requires_grad for name, p in qsam.named_parameters()} == flags
    assert not module.training and torch.equal(torch.random.get_rng_state(), rng)
    assert module.q_proj.weight.device.type == "cpu"


def test_learned_scales_move_and_weights_do_not(qsam, calib2):
    unit = _qdrop_unit(qsam)
    module = unit.module(qsam)
    weight = module.q_proj.weight.detach().clone()
    scale = module.qk_matmul.lhs_quantizer.scale.detach().clone()
    settings = ReconSettings.from_config(ReconConfig(iters=3, scale_lr=1e-2))
    reconstruct_unit_plain(qsam, unit, capture_block_io(qsam, unit, calib2), settings)
    assert torch.equal(module.q_proj.weight, weight)
    assert not torch.equal(module.qk_matmul.lhs_quantizer.scale, scale)


def test_unit_without_learnable_parameters_is_rejected(qsam, calib2):
    unit = find_units(qsam, "attention_mlp")[0]
    block_io = capture_block_io(qsam, unit, calib2)
    with pytest.raises(ValueError, match="nothing to optimise"):
        ReconstructionStage(unit.module(qsam), unit, block_io, ReconSettings.from_config(ReconConfig(iters=1)))

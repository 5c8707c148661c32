"""Decoder steps and span units: bit-identical to the transformer, groupings, span caches, reconstruction."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import TwoWayTransformer
from segment_anything.modeling.common import MLPBlock
from torch import nn

from carsam.config import JcarConfig, ReconConfig, RunConfig
from carsam.methods.calibrate import quantize_calibrate_
from carsam.methods.jcar import jcar_settings_for
from carsam.models.adapters import QuantDecoderAttention
from carsam.models.architecture import decoder_attentions
from carsam.models.quantize import QuantConfig
from carsam.quant.adaround import AdaRoundQuantizer
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import quant_modes, quant_modes_set
from carsam.recon.block_io import block_io_loss, capture_block_io
from carsam.recon.driver import UnitRecipe, prepare_unit_, reconstruct_model_, roundable_layers
from carsam.recon.spans import DecoderSpan, decoder_steps, prologue, run_from, run_steps, span_states, step_names
from carsam.recon.stage import ReconSettings
from carsam.recon.units import find_units
from carsam.run_context import RunContext
from carsam.testbed.spec import build_testbed_from_checkpoint, build_testbed_sam
from tests.helpers import rerun_fp

T = "mask_decoder.transformer"
PAIR = ["decoder.layers.0.self_attn", "decoder.layers.0.pair", "decoder.layers.1.self_attn", "decoder.layers.1.pair",
        "decoder.final_attn_token_to_image"]
CHAIN = ["decoder.layers.0.self_attn", "decoder.layers.0.cross_attn_token_to_image", "decoder.layers.0.mlp",
         "decoder.layers.0.chain", "decoder.layers.1.mlp", "decoder.layers.1.chain"]


@pytest.fixture(scope="module")
def fp_sam():
    torch.manual_seed(0)
    return build_testbed_sam()


def _inputs(batch: int, grid: int, dim: int = 256, tokens: int = 7, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random transformer inputs: image_embedding, image_pe `(B, dim, grid, grid)`, point_embedding `(B, 7, dim)`."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, dim, grid, grid, generator=gen), torch.randn(batch, dim, grid, grid, generator=gen),
            torch.randn(batch, tokens, dim, generator=gen))


def _assert_bit_identical(transformer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    with torch.no_grad():
        expected = transformer(*inputs)
        got = run_steps(transformer, *inputs)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_steps_equal_the_fp_transformer_bit_for_bit(fp_sam):
    _assert_bit_identical(fp_sam.mask_decoder.transformer, _inputs(3, 16))


def test_steps_equal_the_quantized_transformer_bit_for_bit(qsam):
    transformer = qsam.mask_decoder.transformer
    assert all(m is QuantMode.QUANTIZED for m in quant_modes(transformer).values())
    _assert_bit_identical(transformer, _inputs(2, 16, seed=1))
    with quant_modes_set(qsam, QuantMode.FP):
        _assert_bit_identical(transformer, _inputs(2, 16, seed=2))


def test_steps_equal_a_vit_b_sized_decoder_bit_for_bit():
    torch.manual_seed(0)
    transformer = TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048).eval()
    _assert_bit_identical(transformer, _inputs(1, 64))


def test_step_names_follow_the_call_order(fp_sam):
    per_layer = ("self_attn", "cross_attn_token_to_image", "mlp", "cross_attn_image_to_token")
    expected = [f"layers.{i}.{n}" for i in range(2) for n in per_layer] + ["final_attn_token_to_image"]
    assert step_names(fp_sam.mask_decoder.transformer) == expected


@pytest.mark.parametrize("first,last", [(0, 4), (1, 4), (3, 6), (7, 9), (4, 5)])
def test_span_forward_equals_the_steps_it_spans(qsam, first, last):
    transformer = qsam.mask_decoder.transformer
    steps = decoder_steps(transformer)
    with torch.no_grad():
        start = run_from(steps[:first], prologue(*_inputs(2, 16)))
        expected = run_from(steps[first:last], start)
        span = DecoderSpan.from_transformer(transformer, [s.name for s in steps[first:last]])
        queries, keys = span(*start)
    assert torch.equal(queries, expected.queries) and torch.equal(keys, expected.keys)


def test_a_layer_span_equals_the_two_way_block(qsam):
    transformer = qsam.mask_decoder.transformer
    names = step_names(transformer)[4:8]
    state = prologue(*_inputs(2, 16, seed=3))
    with torch.no_grad():
        block = transformer.layers[1](queries=state.queries, keys=state.keys, query_pe=state.query_pe,
                                      key_pe=state.key_pe)
        span = DecoderSpan.from_transformer(transformer, names)(*state)
    assert all(torch.equal(a, b) for a, b in zip(block, span))


def test_span_states_stop_at_the_span(qsam):
    transformer = qsam.mask_decoder.transformer
    names = step_names(transformer)[3:6]
    inputs = _inputs(2, 16, seed=4)
    with torch.no_grad():
        start, end = span_states(transformer, names, *inputs)
        start_only, none = span_states(transformer, names, *inputs, end=False)
        steps = decoder_steps(transformer)
        expected_end = run_from(steps[3:6], run_from(steps[:3], prologue(*inputs)))
    assert none is None and all(torch.equal(a, b) for a, b in zip(start, start_only))
    assert all(torch.equal(a, b) for a, b in zip(end, expected_end))


def test_span_holds_the_model_modules_by_reference_and_their_quantizers(qsam):
    unit = find_units(qsam, "chain")[3]  # layers.0.cross_attn_image_to_token, layers.1.self_attn, ...t2i
    span = unit.module(qsam)
    layers = qsam.mask_decoder.transformer.layers
    ops = [step.op for step in span.steps]
    assert ops == [layers[0].cross_attn_image_to_token, layers[1].self_attn, layers[1].cross_attn_token_to_image]
    model_params = {id(p) for p in qsam.parameters()}
    assert all(id(p) in model_params for p in span.parameters())
    assert len(roundable_layers(span)) == 12  # four projections per attention, self-attention included
    assert prepare_unit_(span, UnitRecipe())["adaround_layers"] == 12
    assert sum(isinstance(m, AdaRoundQuantizer) for m in ops[1].modules()) == 4  # swapped in the model itself


def test_non_contiguous_span_raises(fp_sam):
    transformer = fp_sam.mask_decoder.transformer
    names = step_names(transformer)
    with pytest.raises(ValueError, match="contiguous"):
        DecoderSpan.from_transformer(transformer, [names[0], names[2]])
    with pytest.raises(ValueError, match="does not start"):
        DecoderSpan.from_transformer(transformer, ["layers.9.mlp"])


def test_pair_and_chain_groupings_list_their_units_in_order(qsam):
    pair, chain = find_units(qsam, "pair"), find_units(qsam, "chain")
    assert [u.name for u in pair] == PAIR and [u.name for u in chain] == CHAIN
    assert [u.kind for u in pair] == ["attention", "pair", "attention", "pair", "attention"]
    assert [u.kind for u in chain] == ["attention", "attention", "mlp", "chain", "mlp", "chain"]
    assert pair[1].steps == ("layers.0.cross_attn_token_to_image", "layers.0.mlp", "layers.0.cross_attn_image_to_token")
    assert chain[3].steps == ("layers.0.cross_attn_image_to_token", "layers.1.self_attn",
                              "layers.1.cross_attn_token_to_image")
    assert chain[5].steps == ("layers.1.cross_attn_image_to_token", "final_attn_token_to_image")
    assert all(u.streams == ("queries", "keys") and u.path == T for u in pair + chain if u.steps)
    assert pair[0] == find_units(qsam, "attention_mlp")[0]  # single units are the attention_mlp ones


def _unit_ops(sam: nn.Module, grouping: str) -> list[nn.Module]:
    ops = []
    for unit in find_units(sam, grouping):
        module = unit.module(sam)
        ops += [step.op for step in module.steps] if unit.steps else [module]
    return ops


def _decoder_ops(transformer: nn.Module) -> list[nn.Module]:
    return [m for m in transformer.modules() if isinstance(m, (*decoder_attentions(), QuantDecoderAttention, MLPBlock))]


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("grouping", ["pair", "chain", "attention_mlp", "decoder"])
def test_groupings_cover_every_decoder_attention_and_mlp_once(grouping, depth):
    sam = nn.Module()
    sam.mask_decoder = nn.Module()
    sam.mask_decoder.transformer = TwoWayTransformer(depth=depth, embedding_dim=32, num_heads=2, mlp_dim=64)
    ops = _unit_ops(sam, grouping)
    expected = _decoder_ops(sam.mask_decoder.transformer)
    assert len(ops) == len(expected) == 4 * depth + 1
    assert {id(m) for m in ops} == {id(m) for m in expected}


def test_groupings_cover_the_quantized_testbed_once(qsam):
    for grouping in ("pair", "chain", "decoder"):
        ops = _unit_ops(qsam, grouping)
        assert sorted(map(id, ops)) == sorted(map(id, _decoder_ops(qsam.mask_decoder.transformer)))


@pytest.mark.parametrize("grouping,index", [("pair", 1), ("pair", 3), ("chain", 3), ("chain", 5)])
def test_span_cache_targets_equal_the_fp_span_on_its_fp_inputs(qsam, calib2, grouping, index):
    unit = find_units(qsam, grouping)[index]
    cache = capture_block_io(qsam, unit, calib2)
    assert len(cache) == 2 and cache.num_prompts == calib2.num_prompts
    for sample, outputs in zip(cache.samples, rerun_fp(qsam, cache)):
        assert sample.args == () and set(sample.kwargs) == {"queries", "keys", "query_pe", "key_pe"}
        assert sample.targets[0].shape == sample.kwargs["queries"].shape
        assert sample.targets[1].shape == sample.kwargs["keys"].shape and sample.targets[1].device.type == "cpu"
        assert all(torch.equal(out, target) for out, target in zip(outputs, sample.targets))


def test_last_span_target_is_the_fp_transformer_output(qsam, calib2):
    unit = find_units(qsam, "chain")[-1]
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = qsam.mask_decoder.transformer.register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        cache = capture_block_io(qsam, unit, calib2)
    finally:
        hook.remove()
    fp_outputs = outputs[:len(cache)]  # the FP pass comes first, one call per image here
    for sample, out in zip(cache.samples, fp_outputs):
        assert all(torch.equal(a, b) for a, b in zip(sample.targets, out))


def test_span_quantized_inputs_differ_from_fp_inputs_but_targets_stay_fp(qsam, calib2):
    unit = find_units(qsam, "chain")[3]
    fp_cache = capture_block_io(qsam, unit, calib2, inputs="fp")
    q_cache = capture_block_io(qsam, unit, calib2, inputs="quantized")
    assert q_cache.inputs == "quantized"
    for fp_s, q_s in zip(fp_cache.samples, q_cache.samples):
        assert all(torch.equal(a, b) for a, b in zip(fp_s.targets, q_s.targets))
        assert not torch.equal(fp_s.kwargs["queries"], q_s.kwargs["queries"])
        assert torch.equal(fp_s.kwargs["query_pe"], q_s.kwargs["query_pe"])  # prompts are not quantized


def test_span_cache_restores_modes_and_removes_hooks(qsam, calib2):
    before = quant_modes(qsam)
    capture_block_io(qsam, find_units(qsam, "pair")[1], calib2, inputs="quantized")
    transformer = qsam.mask_decoder.transformer
    assert quant_modes(qsam) == before
    assert not transformer._forward_hooks and not transformer._forward_pre_hooks


def test_pair_reconstruction_lowers_the_span_loss_from_rtn(random_testbed_checkpoint, calib2):
    torch.manual_seed(0)
    sam = build_testbed_from_checkpoint(random_testbed_checkpoint)
    config = RunConfig(method="brecq", quant=QuantConfig(w_observer="minmax", quantize_encoder=False))
    quantize_calibrate_(sam, calib2, config, RunContext())
    unit = find_units(sam, "pair")[1]  # layers.0: token->image, MLP, image->token
    cache = capture_block_io(sam, unit, calib2, inputs="quantized")
    rtn = block_io_loss(sam, cache)
    recon = ReconConfig(iters=60, alpha_lr=1e-2)
    settings_for = jcar_settings_for(ReconSettings.from_config(recon), JcarConfig(enabled=True))
    record = reconstruct_model_(sam, calib2, recon, UnitRecipe(), units=[unit], settings_for=settings_for).record()
    assert record["num_units"] == 1 and record["baked_layers"] == 10
    assert [e["after"] for e in record["interference"]] == ["start", unit.name]  # recon.track_interference
    unit_record = record["units"][0]
    assert unit_record["kind"] == "pair" and set(unit_record["last"]) == {"queries", "keys", "round", "total"}
    assert unit_record["stage"]["reduction"] == "mean"
    assert block_io_loss(sam, cache) < rtn


def test_decoder_grouping_is_one_unit_whose_target_is_the_fp_transformer_output(qsam, calib2):
    units = find_units(qsam, "decoder")
    assert [(u.name, u.kind, u.streams) for u in units] == [("decoder.all", "decoder", ("queries", "keys"))]
    assert list(units[0].steps) == step_names(qsam.mask_decoder.transformer)
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = qsam.mask_decoder.transformer.register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        block_io = capture_block_io(qsam, units[0], calib2)
    finally:
        hook.remove()
    for sample, out, rerun in zip(block_io.samples, outputs[:len(block_io)], rerun_fp(qsam, block_io)):
        assert all(torch.equal(a, b) for a, b in zip(sample.targets, out))  # the FP transformer's output
        assert all(torch.equal(a, b) for a, b in zip(rerun, sample.targets))  # the span reproduces it

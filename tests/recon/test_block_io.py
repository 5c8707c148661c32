"""Block I/O block_io: FP targets reproduced exactly, quantized-input option, memory accounting, no leaks."""

from __future__ import annotations

import pytest
import torch

from carsam.quant.quantizers import QuantMode
from carsam.quant.state import quant_modes
from carsam.recon.block_io import capture_block_io
from carsam.recon.units import find_units
from tests.helpers import rerun_fp


@pytest.mark.parametrize("grouping,index", [("attention_mlp", 1), ("attention_mlp", 2), ("block", 0), ("block", 2)])
def test_fp_unit_on_cached_fp_inputs_reproduces_cached_targets_exactly(qsam, calib2, grouping, index):
    unit = find_units(qsam, grouping)[index]
    block_io = capture_block_io(qsam, unit, calib2)
    assert len(block_io) == 2
    for sample, outputs in zip(block_io.samples, rerun_fp(qsam, block_io)):
        assert len(outputs) == len(unit.streams) == len(sample.targets)
        for out, target in zip(outputs, sample.targets):
            assert torch.equal(out, target)


def test_decoder_sample_holds_one_image_with_all_its_boxes(qsam, calib2):
    unit = find_units(qsam, "attention_mlp")[1]  # token -> image: q (B, 7, 256), k and v (B, 256, 256)
    block_io = capture_block_io(qsam, unit, calib2)
    for image_id, sample in zip(calib2.image_ids, block_io.samples):
        boxes = len(calib2.prompts(image_id)[0])
        assert sample.args == () and set(sample.kwargs) == {"q", "k", "v"}
        assert sample.kwargs["q"].shape[:1] == sample.kwargs["k"].shape[:1] == (boxes,)
        assert sample.targets[0].shape == sample.kwargs["q"].shape
        assert sample.targets[0].device.type == "cpu"
    assert block_io.num_prompts == calib2.num_prompts


def test_block_cache_keeps_both_streams_and_the_positional_encodings(qsam, calib2):
    block_io = capture_block_io(qsam, find_units(qsam, "block")[0], calib2)
    sample = block_io.samples[0]
    assert set(sample.kwargs) == {"queries", "keys", "query_pe", "key_pe"}
    queries, keys = sample.targets
    assert queries.shape == sample.kwargs["queries"].shape and keys.shape == sample.kwargs["keys"].shape


def test_encoder_block_cache_reproduces_targets(random_testbed_checkpoint, calib2):
    from carsam.testbed.spec import build_testbed_from_checkpoint

    sam = build_testbed_from_checkpoint(random_testbed_checkpoint)
    block_io = capture_block_io(sam, find_units(sam, "encoder_block")[1], calib2)
    assert block_io.samples[0].args[0].shape == (1, 16, 16, 128)
    for sample, outputs in zip(block_io.samples, rerun_fp(sam, block_io)):
        assert torch.equal(outputs[0], sample.targets[0])


def test_quantized_inputs_differ_from_fp_inputs_but_targets_stay_fp(qsam, calib2):
    unit = find_units(qsam, "attention_mlp")[4]  # layer 1 self-attention: downstream of quantized layers
    fp_cache = capture_block_io(qsam, unit, calib2, inputs="fp")
    q_cache = capture_block_io(qsam, unit, calib2, inputs="quantized")
    for fp_s, q_s in zip(fp_cache.samples, q_cache.samples):
        assert torch.equal(fp_s.targets[0], q_s.targets[0])
        assert not torch.equal(fp_s.kwargs["q"], q_s.kwargs["q"])


def test_cache_restores_modes_and_removes_hooks(qsam, calib2):
    before = quant_modes(qsam)
    unit = find_units(qsam, "attention_mlp")[0]
    capture_block_io(qsam, unit, calib2, inputs="quantized")
    assert quant_modes(qsam) == before and all(m is QuantMode.QUANTIZED for m in before.values())
    module = unit.module(qsam)
    assert not module._forward_hooks and not module._forward_pre_hooks


def test_nbytes_counts_every_cached_tensor(qsam, calib2):
    block_io = capture_block_io(qsam, find_units(qsam, "attention_mlp")[0], calib2)
    expected = sum(t.numel() * 4 for s in block_io.samples for t in (*s.kwargs.values(), *s.targets))
    assert block_io.nbytes == expected
    half = capture_block_io(qsam, block_io.unit, calib2, dtype=torch.float16)
    assert half.nbytes == expected // 2


def test_order_is_seeded_and_visits_every_sample_each_epoch(qsam, calib2):
    block_io = capture_block_io(qsam, find_units(qsam, "attention_mlp")[0], calib2)
    order = block_io.order(6, seed=3)
    assert order == block_io.order(6, seed=3)
    assert sorted(order[:2]) == sorted(order[2:4]) == [0, 1]


def test_unknown_input_source_raises(qsam, calib2):
    with pytest.raises(ValueError, match="inputs must be one of"):
        capture_block_io(qsam, find_units(qsam, "attention_mlp")[0], calib2, inputs="both")

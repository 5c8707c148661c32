"""Token->image attention maps: the mask token's softmax row by hand, FP == FP, W4A4 moves them, the file."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from carsam.diagnostics.maps import (
    MASK_TOKEN_ROW,
    AttentionMaps,
    collect_attention_maps,
    input_frame,
    read_attention_maps,
    write_attention_maps,
)
from carsam.eval.inference import SamBoxPredictor
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import quant_modes, quant_modes_set
from carsam.testbed.spec import build_testbed_from_checkpoint

PROMPTS = 2


@pytest.fixture(scope="module")
def maps(w4a4, val) -> AttentionMaps:
    return collect_attention_maps(w4a4, val, val.image_ids[:2], PROMPTS)


def test_shapes_layers_and_distributions(maps, w4a4, val):
    grid = w4a4.prompt_encoder.image_embedding_size[0]
    expected = sum(min(PROMPTS, len(val.prompts(i)[0])) for i in val.image_ids[:2])
    assert maps.fp.shape == maps.q.shape == (expected, 3, grid, grid)
    assert maps.layers.tolist() == [0, 1, 2]  # both layers, then the final attention (layer = depth)
    np.testing.assert_allclose(maps.fp.sum(axis=(2, 3)), 1.0, atol=1e-5)
    np.testing.assert_allclose(maps.q.sum(axis=(2, 3)), 1.0, atol=1e-5)
    assert maps.images.dtype == np.uint8 and maps.images.shape[1:] == (128, 128, 3)


def test_final_map_is_the_mask_token_softmax_row_computed_by_hand(maps, random_testbed_checkpoint, val):
    plain = build_testbed_from_checkpoint(random_testbed_checkpoint)
    attention = plain.mask_decoder.transformer.final_attn_token_to_image
    captured = []
    handle = attention.register_forward_pre_hook(lambda _m, _args, kwargs: captured.append((kwargs["q"], kwargs["k"])),
                                                 with_kwargs=True)
    image_id = val.image_ids[0]
    predictor = SamBoxPredictor(plain)
    with torch.no_grad():
        predictor.predict(predictor.embed_image(val, image_id), val.prompts(image_id)[0][:PROMPTS])
        handle.remove()
        q_in, k_in = captured[0]
        heads = attention.num_heads
        q = attention.q_proj(q_in).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, Nq, c)
        k = attention.k_proj(k_in).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, Nk, c)
        P = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    by_hand = P[:, :, MASK_TOKEN_ROW].mean(dim=1).numpy()  # (B, Nk)
    mine = maps.fp[maps.image_ids == image_id][:, -1].reshape(len(by_hand), -1)
    np.testing.assert_allclose(mine, by_hand, atol=1e-6)


def test_fp_pass_equals_quantized_pass_when_every_quantizer_is_fp(w4a4, val):
    with quant_modes_set(w4a4, QuantMode.FP):
        fp_only = collect_attention_maps(w4a4, val, val.image_ids[:1], 1)
    np.testing.assert_array_equal(fp_only.fp, fp_only.q)


def test_w4a4_moves_the_maps_and_leaves_the_model_as_it_was(maps, w4a4, val):
    assert np.abs(maps.q - maps.fp).max() > 1e-3
    sam = copy.deepcopy(w4a4).train()
    before = quant_modes(sam)
    collect_attention_maps(sam, val, val.image_ids[:1], 1)
    assert quant_modes(sam) == before and sam.training
    assert not any(m._forward_pre_hooks for m in sam.modules())


def test_input_frame_resizes_pads_and_maps_boxes(w4a4):
    predictor = SamBoxPredictor(w4a4)
    image = np.full((64, 32, 3), 200, dtype=np.uint8)  # long side 64 -> 128: scale 2, width 64, padded to 128
    frame, boxes = input_frame(predictor, image, np.array([[0, 0, 16, 32]], dtype=np.float32))
    assert frame.shape == (128, 128, 3)
    assert (frame[:, :64] == 200).all() and (frame[:, 64:] == 0).all()
    np.testing.assert_allclose(boxes, [[0, 0, 32, 64]])
    small, small_boxes = input_frame(predictor, image, np.array([[0, 0, 16, 32]], dtype=np.float32), side=64)
    assert small.shape == (64, 64, 3)
    np.testing.assert_allclose(small_boxes, [[0, 0, 16, 32]])


def test_file_round_trip_and_bad_files(maps, tmp_path):
    write_attention_maps(tmp_path, maps)
    back = read_attention_maps(tmp_path)
    for name in ("fp", "q", "layers", "image_ids", "prompt_index", "boxes", "images"):
        np.testing.assert_array_equal(getattr(back, name), getattr(maps, name))
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, no leftover
    (tmp_path / "attention_maps.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError):
        read_attention_maps(tmp_path)


def test_inconsistent_arrays_and_bad_arguments_raise(maps, w4a4, val):
    with pytest.raises(ValueError, match="prompts"):
        AttentionMaps(fp=maps.fp, q=maps.q, layers=maps.layers, image_ids=maps.image_ids[:1],
                      prompt_index=maps.prompt_index, boxes=maps.boxes, images=maps.images)
    with pytest.raises(ValueError, match="prompts_per_image"):
        collect_attention_maps(w4a4, val, val.image_ids[:1], 0)

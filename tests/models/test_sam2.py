"""SAM2's image path: the regrouped model, its quantized twins, the FP list, checkpoints and the predictor."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from sam2.modeling.backbones.hieradet import MultiScaleAttention
from sam2.modeling.sam.transformer import Attention
from sam2.sam2_image_predictor import SAM2ImagePredictor
from torch import nn

from carsam.eval.inference import box_predictor
from carsam.models.adapters import QuantDecoderAttention, QuantHieraAttention
from carsam.models.checkpoint import CheckpointError
from carsam.models.quantize import SAM2_FP_MODULES, QuantConfig, quantize_
from carsam.models.sam import build_model
from carsam.models.sam2_build import build_sam2_base, image_model
from carsam.models.sam2_image import Sam2ImageModel
from carsam.quant.quantizers import UniformQuantizer, iter_quantizers
from carsam.quant.state import set_quant_mode


def _random_sam2_t(seed: int = 0) -> Sam2ImageModel:
    torch.manual_seed(seed)
    return image_model(build_sam2_base("sam2_t"), "sam2_t")


def _act_q(_: str) -> UniformQuantizer:
    return UniformQuantizer(8)


def _weight_q(_: str) -> UniformQuantizer:
    return UniformQuantizer(8, ch_axis=0)


def _hiera_attention() -> MultiScaleAttention:
    torch.manual_seed(0)
    return MultiScaleAttention(16, 32, num_heads=2, q_pool=nn.MaxPool2d(2, 2))


def test_quantize_swaps_every_sam2_attention_and_keeps_the_fp_list_fp():
    sam = quantize_(_random_sam2_t(), QuantConfig())
    hiera = [m for m in sam.image_encoder.trunk.blocks]
    assert all(isinstance(b.attn, QuantHieraAttention) for b in hiera) and len(hiera) == 12
    decoder = [m for m in sam.mask_decoder.transformer.modules() if isinstance(m, QuantDecoderAttention)]
    assert len(decoder) == 7 and all(a.fp_kernel == "sdpa" for a in decoder)
    assert not [m for m in sam.modules() if isinstance(m, (Attention, MultiScaleAttention))]
    paths = [p for p, _ in iter_quantizers(sam)]
    assert not [p for p in paths if any(p.startswith(fp + ".") for fp in SAM2_FP_MODULES)]
    assert any(p.startswith("image_encoder.neck.convs.") for p in paths)  # the FPN neck is quantized
    # the pooled-Q block keeps the block's own MaxPool2d object (shared, as SAM2 builds it)
    pooled = [b for b in hiera if b.pool is not None]
    assert pooled and all(b.attn.q_pool is b.pool for b in pooled)


def test_conv_s0_s1_and_no_mem_embed_belong_to_the_image_encoder():
    sam = _random_sam2_t()
    assert not hasattr(sam.mask_decoder, "conv_s0") and not hasattr(sam.mask_decoder, "conv_s1")
    keys = set(sam.state_dict())
    assert {"image_encoder.conv_s0.weight", "image_encoder.conv_s1.weight", "image_encoder.no_mem_embed"} <= keys
    assert not [k for k in keys if k.startswith(("memory_", "obj_ptr"))]  # the video modules are dropped


def test_hiera_twin_in_fp_mode_is_bit_identical_and_hooked_matmuls_agree_to_float_rounding():
    attn = _hiera_attention()
    x = torch.randn(3, 8, 8, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = attn(x)
        twin = QuantHieraAttention.from_attention(attn, _weight_q, _act_q)
        assert torch.equal(twin(x), expected)  # SDPA, as SAM2
        handle = twin.qk_matmul.register_forward_hook(lambda *args: None)
        explicit = twin(x)  # an observer forces the named MatMuls
        handle.remove()
    assert explicit.shape == (3, 4, 4, 32) and not torch.equal(explicit, expected)
    torch.testing.assert_close(explicit, expected, rtol=1e-5, atol=1e-6)


def test_decoder_twin_sdpa_path_is_exact_and_a_quantized_operand_takes_the_matmuls():
    torch.manual_seed(0)
    attn = Attention(64, num_heads=4, downsample_rate=2)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 64, generator=gen) for n in (7, 36, 36))
    twin = QuantDecoderAttention.from_attention(attn, _weight_q, _act_q, fp_kernel="sdpa")
    with torch.no_grad():
        expected = attn(q, k, v)
        assert torch.equal(twin(q, k, v), expected)
        set_quant_mode(twin, "calibrate")  # calibration must see the operands: the MatMuls run
        calibrated = twin(q, k, v)
        assert all(qz.observer.has_data for _, qz in iter_quantizers(twin.qk_matmul))
        set_quant_mode(twin, "quantized")
        quantized = twin(q, k, v)
    torch.testing.assert_close(calibrated, expected, rtol=1e-5, atol=1e-6)
    assert (quantized - expected).abs().max() > 1e-4  # 8-bit operands change the output


def test_sam2_image_model_and_its_fp_twin_match_sam2_image_predictor_bit_for_bit():
    """The issue's FP-equality check, at sam2_t's real 1024 input (a random init: no checkpoint here)."""
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    boxes = np.array([[4.0, 6.0, 60.0, 50.0], [10.5, 0.0, 127.0, 95.0], [30.0, 30.0, 31.0, 33.0]])
    torch.manual_seed(0)
    reference = SAM2ImagePredictor(build_sam2_base("sam2_t"))
    reference.set_image(image)
    ref_masks, ref_iou, _ = reference.predict(box=boxes, multimask_output=False)
    for model in (_random_sam2_t(), quantize_(_random_sam2_t(), QuantConfig())):
        predictor = box_predictor(model)
        embedding = predictor.embed(image)
        masks, iou = predictor.predict(embedding, boxes)
        assert torch.equal(embedding.features, reference._features["image_embed"])
        assert all(torch.equal(a, b) for a, b in zip(embedding.high_res, reference._features["high_res_feats"]))
        assert np.array_equal(masks, ref_masks[:, 0]) and np.array_equal(iou, ref_iou[:, 0])
        one_mask, one_iou = predictor.predict(embedding, boxes[:1])  # one box: no image repeat, same answer
        assert np.array_equal(one_mask, masks[:1]) and np.array_equal(one_iou, iou[:1])


def test_stability_fallback_is_the_decoders_flag(tmp_path):
    sam = _random_sam2_t()
    assert sam.stability_fallback and sam.mask_decoder.dynamic_multimask_via_stability
    path = tmp_path / "sam2_t.pt"
    torch.manual_seed(0)
    torch.save({"model": build_sam2_base("sam2_t").state_dict()}, path)
    off = build_model("sam2_t", path, sam2_stability_fallback=False)
    assert not off.stability_fallback and not off.mask_decoder.dynamic_multimask_via_stability
    assert torch.equal(off.state_dict()["image_encoder.no_mem_embed"], sam.state_dict()["image_encoder.no_mem_embed"])


def test_wrong_and_corrupt_checkpoints_are_refused_with_the_fix(tmp_path):
    other = tmp_path / "sam2_s.pt"
    torch.manual_seed(0)
    torch.save({"model": build_sam2_base("sam2_s").state_dict()}, other)
    with pytest.raises(CheckpointError, match="does not match model type 'sam2_t'.*set model.type"):
        build_model("sam2_t", other)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or not a torch file"):
        build_model("sam2_t", corrupt)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        build_model("sam2_t", tmp_path / "missing.pt")


def test_importing_carsam_leaves_hydra_uninitialised():
    """`sam2` initialises Hydra's global state on import: carsam imports it only to build a SAM2 model."""
    code = ("import carsam.cli, carsam.pipeline, carsam.models.quantize, carsam.eval.inference, sys; "
            "print('sam2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_units_and_diagnostic_sites_are_found_on_the_sam2_testbed():
    """Reconstruction units and attention sites are found by type, so SAM2's Hiera blocks and its two-way
    transformer give the same groupings as SAM v1's (the SAM2 testbed: 6 Hiera blocks, a depth-2 decoder)."""
    from carsam.diagnostics.collector import attention_sites
    from carsam.recon.units import find_units
    from carsam.testbed.sam2_spec import build_sam2_testbed

    torch.manual_seed(0)
    sam = quantize_(build_sam2_testbed(), QuantConfig())
    encoder = find_units(sam, "encoder_block")
    assert [u.path for u in encoder] == [f"image_encoder.trunk.blocks.{i}" for i in range(6)]
    assert [u.name for u in find_units(sam, "pair")] == ["decoder.layers.0.self_attn", "decoder.layers.0.pair",
                                                         "decoder.layers.1.self_attn", "decoder.layers.1.pair",
                                                         "decoder.final_attn_token_to_image"]
    assert len(find_units(sam, "attention_mlp")) == 9
    sites = attention_sites(sam, ("encoder", "decoder"))
    assert [s.path for s in sites[:6]] == [f"image_encoder.trunk.blocks.{i}.attn" for i in range(6)]
    assert len(sites) == 13 and all(isinstance(s.attention, QuantHieraAttention) for s in sites[:6])


def test_sam2_input_frame_is_the_square_resize_its_grid_covers():
    """SAM2's frame (the picture under its attention maps) is the S x S stretch of the image, not SAM v1's
    padded long-side resize: a (64, 32) image fills the whole 256 x 256 frame, and a box scales by S/W, S/H."""
    from carsam.diagnostics.maps import input_frame
    from carsam.testbed.sam2_spec import build_sam2_testbed

    torch.manual_seed(0)
    predictor = box_predictor(build_sam2_testbed())
    image = np.full((64, 32, 3), 200, dtype=np.uint8)
    frame, boxes = input_frame(predictor, image, np.array([[0, 0, 16, 32]], dtype=np.float32))
    assert frame.shape == (256, 256, 3) and (frame == 200).all()  # no padding
    np.testing.assert_allclose(boxes, [[0, 0, 128, 128]], atol=1e-4)  # x by 256/32, y by 256/64
    small, small_boxes = input_frame(predictor, image, np.array([[0, 0, 16, 32]], dtype=np.float32), side=64)
    assert small.shape == (64, 64, 3)
    np.testing.assert_allclose(small_boxes, [[0, 0, 32, 32]], atol=1e-4)

"""Quantized twins of SAM's encoder and decoder attention."""

from __future__ import annotations

import torch
from segment_anything.modeling import image_encoder, transformer
from torch import nn

from carsam.models.adapters import QuantDecoderAttention, QuantEncoderAttention
from carsam.quant.modules import QuantLinear, QuantMatMul
from carsam.quant.quantizers import UniformQuantizer, iter_quantizers
from carsam.quant.state import set_quant_mode


def _weight_q(_: str) -> UniformQuantizer:
    return UniformQuantizer(8, ch_axis=0)


def _act_q(_: str) -> UniformQuantizer:
    return UniformQuantizer(8)


def _decoder_attention() -> transformer.Attention:
    torch.manual_seed(0)
    return transformer.Attention(64, num_heads=4, downsample_rate=2)


def _encoder_attention() -> image_encoder.Attention:
    torch.manual_seed(0)
    attn = image_encoder.Attention(32, num_heads=4, use_rel_pos=True, input_size=(6, 6))
    with torch.no_grad():  # rel-pos tables are zero-initialised: give them values to exercise the path
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    return attn


def _qkv_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, 64, generator=gen) for n in (7, 36, 36))
    return q, k, v


def test_decoder_twin_in_fp_mode_is_bit_identical() -> None:
    attn = _decoder_attention()
    twin = QuantDecoderAttention.from_attention(attn, _weight_q, _act_q)
    q, k, v = _qkv_inputs()
    assert torch.equal(twin(q, k, v), attn(q, k, v))
    assert (twin.embedding_dim, twin.internal_dim, twin.num_heads) == (64, 32, 4)


def test_encoder_twin_in_fp_mode_is_bit_identical() -> None:
    attn = _encoder_attention()
    twin = QuantEncoderAttention.from_attention(attn, _weight_q, _act_q)
    x = torch.randn(2, 6, 6, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(twin(x), attn(x))
    assert twin.rel_pos_h is attn.rel_pos_h


def test_twins_keep_the_original_state_dict_keys() -> None:
    decoder, encoder = _decoder_attention(), _encoder_attention()
    twins = (QuantDecoderAttention.from_attention(decoder, _weight_q, _act_q),
             QuantEncoderAttention.from_attention(encoder, _weight_q, _act_q))
    for attn, twin in zip((decoder, encoder), twins):
        assert set(attn.state_dict()) <= set(twin.state_dict())


def test_matmul_hooks_see_q_and_k_transposed_and_probabilities_and_v() -> None:
    twin = QuantDecoderAttention.from_attention(_decoder_attention(), _weight_q, _act_q)
    q, k, v = _qkv_inputs()
    seen: dict[str, tuple[torch.Tensor, ...]] = {}
    for name in ("qk_matmul", "pv_matmul"):
        getattr(twin, name).register_forward_hook(lambda m, inp, out, n=name: seen.__setitem__(n, (*inp, out)))
    twin(q, k, v)
    lhs, rhs, scores = seen["qk_matmul"]
    assert lhs.shape == (2, 4, 7, 8) and rhs.shape == (2, 4, 8, 36) and scores.shape == (2, 4, 7, 36)
    probs = seen["pv_matmul"][0]
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 7)) and bool((probs >= 0).all())


def test_factories_returning_none_keep_linears_and_matmul_operands_fp() -> None:
    twin = QuantDecoderAttention.from_attention(_decoder_attention(), lambda _: None, lambda _: None)
    assert isinstance(twin.q_proj, nn.Linear) and isinstance(twin.qk_matmul, QuantMatMul)
    assert list(iter_quantizers(twin)) == []


def test_decoder_twin_quantizer_paths_are_named_per_operand() -> None:
    twin = QuantDecoderAttention.from_attention(_decoder_attention(), _weight_q, _act_q)
    paths = {p for p, _ in iter_quantizers(twin)}
    assert {"q_proj.weight_quantizer", "out_proj.input_quantizer", "qk_matmul.lhs_quantizer",
            "qk_matmul.rhs_quantizer", "pv_matmul.lhs_quantizer", "pv_matmul.rhs_quantizer"} <= paths
    assert isinstance(twin.v_proj, QuantLinear) and len(paths) == 4 * 2 + 4


def test_w8a8_twins_stay_close_to_fp() -> None:
    attn = _decoder_attention()
    twin = QuantDecoderAttention.from_attention(attn, _weight_q, _act_q)
    q, k, v = _qkv_inputs()
    set_quant_mode(twin, "calibrate")
    twin(q, k, v)
    set_quant_mode(twin, "quantized")
    with torch.no_grad():
        ref, out = attn(q, k, v), twin(q, k, v)
    assert float((out - ref).norm() / ref.norm()) < 0.02

"""Quantized twins of SAM's encoder and decoder attention."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import image_encoder, transformer
from torch import nn

from carsam.models.adapters import REL_POS_QUERIES, QuantDecoderAttention, QuantEncoderAttention
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


@pytest.mark.parametrize("rel_pos_query", REL_POS_QUERIES)
def test_encoder_twin_in_fp_mode_is_bit_identical(rel_pos_query: str) -> None:
    attn = _encoder_attention()
    twin = QuantEncoderAttention.from_attention(attn, _weight_q, _act_q, rel_pos_query)
    x = torch.randn(2, 6, 6, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(twin(x), attn(x))
    assert twin.rel_pos_h is attn.rel_pos_h


def _reference_encoder_scores(twin: QuantEncoderAttention, x: torch.Tensor, rel_query: str) -> torch.Tensor:
    """The scores entering the softmax, by hand: quantized content term plus the rel-pos term of either the
    quantized query (Q̂s / s, Q̂s the lhs quantizer's output on Q·s) or the FP query. `(B*heads, HW, HW)`."""
    b, h, w, _ = x.shape
    qkv = twin.qkv(x).reshape(b, h * w, 3, twin.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.reshape(3, b * twin.num_heads, h * w, -1).unbind(0)
    scaled_q_hat = twin.qk_matmul.lhs_quantizer(q * twin.scale)
    content = scaled_q_hat @ twin.qk_matmul.rhs_quantizer(k.transpose(-2, -1))
    query = scaled_q_hat / twin.scale if rel_query == "quantized" else q
    return image_encoder.add_decomposed_rel_pos(content, query, twin.rel_pos_h, twin.rel_pos_w, (h, w), (h, w))


@pytest.mark.parametrize("rel_pos_query", REL_POS_QUERIES)
def test_encoder_rel_pos_term_reads_the_query_its_placement_names(rel_pos_query: str) -> None:
    """PTQ4SAM's placement (`quantized`) feeds the quantized query to the relative-position term, `fp` the
    unquantized one; checked against the scores computed by hand, and the two placements differ at 4 bits."""
    twin = QuantEncoderAttention.from_attention(_encoder_attention(), lambda _: UniformQuantizer(4, ch_axis=0),
                                                lambda _: UniformQuantizer(4), rel_pos_query)
    x = torch.randn(2, 6, 6, 32, generator=torch.Generator().manual_seed(2))
    set_quant_mode(twin, "calibrate")
    twin(x)
    set_quant_mode(twin, "quantized")
    seen: list[torch.Tensor] = []
    twin.pv_matmul.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        twin(x)
        expected = {name: _reference_encoder_scores(twin, x, name).softmax(-1) for name in REL_POS_QUERIES}
    probs = seen[0]
    assert torch.allclose(probs, expected[rel_pos_query], atol=1e-6)
    other = next(name for name in REL_POS_QUERIES if name != rel_pos_query)
    assert float((expected[other] - expected[rel_pos_query]).abs().max()) > 1e-3


def test_encoder_query_quantizer_runs_once_per_forward_with_rel_pos_from_it() -> None:
    """The quantized placement must not call the query quantizer a second time (a calibration would observe
    the queries twice, QDrop would draw twice)."""
    twin = QuantEncoderAttention.from_attention(_encoder_attention(), _weight_q, _act_q, "quantized")
    calls: list[int] = []
    twin.qk_matmul.lhs_quantizer.register_forward_hook(lambda m, args, out: calls.append(1))
    twin(torch.randn(1, 6, 6, 32))
    assert len(calls) == 1


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

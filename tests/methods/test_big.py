"""PTQ4SAM's Bimodal Integration: channel signs, bimodality detection, folding into q_proj/k_proj."""

from __future__ import annotations

import logging

import pytest
import torch
from segment_anything.modeling import transformer

from carsam.methods.big import (
    bimodality_coefficient,
    channel_signs,
    fold_signs_,
    integrate_bimodal_,
    is_bimodal,
)
from carsam.models.adapters import QuantDecoderAttention
from carsam.quant.quantizers import QuantMode, UniformQuantizer
from carsam.quant.state import set_quant_mode


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _signs(c: int, seed: int = 0) -> torch.Tensor:
    return torch.where(torch.rand(c, generator=_gen(seed)) < 0.5, -1.0, 1.0)


def _bimodal_attention() -> tuple[transformer.Attention, torch.Tensor]:
    """A token->image style Attention (E=64, internal 32, 4 heads) whose keys are bimodal per tensor:
    each k_proj output channel sits near +3 or -3 (bias), with small spread (small inputs)."""
    torch.manual_seed(0)
    attn = transformer.Attention(64, num_heads=4, downsample_rate=2)
    with torch.no_grad():
        attn.k_proj.bias.copy_(3.0 * _signs(32, seed=1))
    image_tokens = 0.3 * torch.randn(2, 200, 64, generator=_gen(2))
    return attn, image_tokens


def _scores(attn: transformer.Attention, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Per-head Q·Kᵀ `(B, heads, Nq, Nk)`."""
    q = attn._separate_heads(attn.q_proj(tokens), attn.num_heads)
    k = attn._separate_heads(attn.k_proj(image), attn.num_heads)
    return q @ k.transpose(-2, -1)


def test_signs_are_plus_or_minus_one_and_follow_the_majority_side() -> None:
    signs = _signs(16)
    keys = 2.0 * signs + 0.5 * torch.randn(3, 100, 16, generator=_gen(1))
    found = channel_signs(keys)
    assert found.shape == (16,) and set(found.tolist()) <= {-1.0, 1.0}
    assert torch.equal(found, signs)


def test_signs_follow_the_larger_mass_mode_not_the_mean() -> None:
    channel = torch.cat([torch.full((60,), -1.0), torch.full((40,), 5.0)])  # mean +1.4, majority negative
    assert channel_signs(channel[:, None]).tolist() == [-1.0]


def test_all_zero_channel_keeps_sign_plus_one() -> None:
    assert channel_signs(torch.zeros(10, 3)).tolist() == [1.0, 1.0, 1.0]


def test_bimodality_coefficient_separates_gaussian_from_two_modes() -> None:
    gauss = torch.randn(20000, generator=_gen(0))
    two_modes = gauss * 0.5 + 3.0 * _signs(20000, seed=1)
    assert bimodality_coefficient(gauss) == pytest.approx(1 / 3, abs=0.03)
    assert bimodality_coefficient(two_modes) > 0.85
    assert not is_bimodal(gauss) and is_bimodal(two_modes)
    assert bimodality_coefficient(torch.ones(10)) == 0.0


def test_fold_leaves_fp_scores_unchanged() -> None:
    attn, image = _bimodal_attention()
    tokens = torch.randn(2, 7, 64, generator=_gen(3))
    before, out_before = _scores(attn, tokens, image), attn(tokens, image, image)
    fold_signs_(attn, _signs(32, seed=4))
    assert torch.allclose(_scores(attn, tokens, image), before, atol=1e-6, rtol=0)
    assert torch.allclose(attn(tokens, image, image), out_before, atol=1e-6, rtol=0)


def test_folded_keys_are_unimodal_on_a_bimodal_example() -> None:
    attn, image = _bimodal_attention()
    keys = attn.k_proj(image).detach()
    assert is_bimodal(keys)
    signs = integrate_bimodal_(attn, keys)
    assert signs is not None and int((signs < 0).sum()) > 0
    folded = attn.k_proj(image).detach()
    assert not is_bimodal(folded) and bool((folded.mean(dim=(0, 1)) > 0).all())


def test_integrate_leaves_unimodal_keys_alone() -> None:
    attn, image = _bimodal_attention()
    with torch.no_grad():
        attn.k_proj.bias.fill_(3.0)
    weight = attn.k_proj.weight.detach().clone()
    assert integrate_bimodal_(attn, attn.k_proj(image).detach()) is None
    assert torch.equal(attn.k_proj.weight, weight)


def test_fold_flips_weight_and_bias_rows_of_q_and_k_only() -> None:
    attn, _ = _bimodal_attention()
    signs = _signs(32, seed=5)
    params = {n: p.detach().clone() for n, p in attn.named_parameters()}
    fold_signs_(attn, signs)
    for name, param in attn.named_parameters():
        flipped = name.split(".")[0] in ("q_proj", "k_proj")
        factor = (signs[:, None] if name.endswith("weight") else signs) if flipped else 1.0
        assert torch.equal(param.detach(), params[name] * factor), name


def test_fold_works_on_the_quantized_twin_and_warns_about_stale_qparams(caplog: pytest.LogCaptureFixture) -> None:
    attn, image = _bimodal_attention()
    twin = QuantDecoderAttention.from_attention(attn, lambda _: UniformQuantizer(8, ch_axis=0),
                                                lambda _: UniformQuantizer(8))
    tokens = torch.randn(2, 7, 64, generator=_gen(3))
    before = twin(tokens, image, image)
    set_quant_mode(twin, QuantMode.CALIBRATE)
    twin(tokens, image, image)
    set_quant_mode(twin, QuantMode.QUANTIZED)
    with caplog.at_level(logging.WARNING, logger="carsam.methods.big"):
        fold_signs_(twin, _signs(32, seed=6))
    assert "k_proj.weight_quantizer" in caplog.text and "qk_matmul.rhs_quantizer" in caplog.text
    set_quant_mode(twin, QuantMode.FP)
    assert torch.allclose(twin(tokens, image, image), before, atol=1e-6, rtol=0)


def test_fold_rejects_bad_signs_and_other_modules() -> None:
    attn, _ = _bimodal_attention()
    with pytest.raises(ValueError, match="shape"):
        fold_signs_(attn, torch.ones(16))
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        fold_signs_(attn, torch.full((32,), 0.5))
    with pytest.raises(TypeError, match="Attention"):
        fold_signs_(torch.nn.Linear(4, 4), torch.ones(4))  # type: ignore[arg-type]

"""Attention statistics on hand-built maps with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from carsam.diagnostics.attention import kl_divergence, mask_mass, mask_to_tokens, normalized_entropy


def test_uniform_rows_have_entropy_one():
    P = torch.full((2, 3, 5, 16), 1 / 16)
    assert torch.allclose(normalized_entropy(P), torch.ones(2, 3, 5))


def test_one_hot_rows_have_entropy_zero():
    P = torch.zeros(4, 10)
    P[torch.arange(4), torch.tensor([0, 3, 9, 5])] = 1.0
    assert torch.equal(normalized_entropy(P), torch.zeros(4))


def test_entropy_of_a_known_row_and_of_single_key_rows():
    P = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert normalized_entropy(P).item() == pytest.approx(math.log(2) / math.log(4))
    assert torch.equal(normalized_entropy(torch.ones(3, 7, 1)), torch.zeros(3, 7))


def test_half_precision_rows_are_upcast():
    assert normalized_entropy(torch.full((1, 8), 1 / 8, dtype=torch.float16)).dtype == torch.float32


def test_kl_matches_the_closed_form():
    p = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    q = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl = kl_divergence(p, q)
    assert kl[0].item() == pytest.approx(expected, rel=1e-6)
    assert kl[1].item() == 0.0


def test_kl_of_identical_maps_is_exactly_zero_and_stays_finite_on_zeros():
    P = torch.softmax(torch.randn(2, 4, 7, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert torch.equal(kl_divergence(P, P.clone()), torch.zeros(2, 4, 7))
    kl = kl_divergence(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert torch.isfinite(kl).all() and kl.item() > 20


def test_kl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        kl_divergence(torch.ones(2, 3), torch.ones(3, 2))


def test_mask_mass_of_a_hand_built_map():
    # 2 rows over 4 image tokens; the mask covers tokens 1 and 2 fully, token 3 by half
    P = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0]])
    weights = torch.tensor([0.0, 1.0, 1.0, 0.5])
    assert torch.allclose(mask_mass(P, weights), torch.tensor([0.2 + 0.3 + 0.2, 0.0]))


def test_mask_mass_broadcasts_one_mask_per_prompt_over_heads():
    P = torch.full((2, 3, 7, 4), 0.25)  # (B, heads, Nq, Nk)
    weights = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])[:, None]  # (B, 1, Nk)
    out = mask_mass(P, weights)
    assert out.shape == (2, 3, 7)
    assert torch.allclose(out[0], torch.full((3, 7), 0.5)) and torch.allclose(out[1], torch.ones(3, 7))


def test_mask_to_tokens_gives_the_covered_fraction_of_each_patch():
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, :8, :12] = True  # patch (0, 0) fully, patch (0, 1) half
    tokens = mask_to_tokens(mask, (32, 32), img_size=32, grid=4)
    expected = torch.zeros(16)
    expected[0], expected[1] = 1.0, 0.5
    assert torch.equal(tokens, expected[None])


def test_mask_to_tokens_resizes_into_the_input_frame_and_pads():
    mask = torch.ones(1, 8, 16, dtype=torch.bool)  # a 8x16 image, long side resized to 32 -> 16x32
    grid = mask_to_tokens(mask, (16, 32), img_size=32, grid=4).reshape(4, 4)
    assert torch.equal(grid[:2], torch.ones(2, 4)) and torch.equal(grid[2:], torch.zeros(2, 4))

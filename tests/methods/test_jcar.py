"""JCAR's per-unit loss settings: stream weights, per-stream mean, variance weighting on known tensors."""

from __future__ import annotations

import pytest
import torch

from carsam.config import JcarConfig, ReconConfig
from carsam.methods.jcar import jcar_settings, jcar_stream_weights
from carsam.recon.block_io import BlockIO, UnitSample
from carsam.recon.losses import pooled_variance, stream_target_variance
from carsam.recon.stage import ReconSettings
from carsam.recon.units import BLOCK_STREAMS, ReconUnit

SPAN = ReconUnit("decoder.layers.0.pair", "mask_decoder.transformer", "pair", BLOCK_STREAMS,
                 ("layers.0.cross_attn_token_to_image", "layers.0.mlp", "layers.0.cross_attn_image_to_token"))
SINGLE = ReconUnit("decoder.layers.0.self_attn", "mask_decoder.transformer.layers.0.self_attn", "attention")


def _cache() -> BlockIO:
    """Two samples: queries values {1, 2, 3, 4} (variance 1.25), keys values {0, 0, 2, 2} (variance 1)."""
    samples = [UnitSample((), {}, (torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[0.0], [0.0]]]))),
               UnitSample((), {}, (torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[2.0], [2.0]]])))]
    return BlockIO(SPAN, samples)


def test_stream_target_variance_pools_every_sample():
    assert stream_target_variance(_cache()) == pytest.approx({"queries": 1.25, "keys": 1.0})
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert pooled_variance([values[:300], values[300:]]) == pytest.approx(values.var(unbiased=False).item())


def test_constant_targets_have_no_variance():
    constant = BlockIO(SPAN, [UnitSample((), {}, (torch.ones(1, 2, 2), torch.zeros(1, 3, 2)))])
    with pytest.raises(ValueError, match="no variance"):
        stream_target_variance(constant)


def test_stream_weights_are_the_config_weights_divided_by_the_variance():
    jcar = JcarConfig(enabled=True, w_tokens=0.5, w_image=2.0)
    assert jcar_stream_weights(SPAN, jcar) == {"queries": 0.5, "keys": 2.0}
    weighted = JcarConfig(enabled=True, w_tokens=0.5, w_image=2.0, variance_weighting=True)
    assert jcar_stream_weights(SPAN, weighted, _cache()) == pytest.approx({"queries": 0.4, "keys": 2.0})
    assert jcar_stream_weights(SINGLE, weighted) == {"out": 1.0}
    with pytest.raises(ValueError, match="block I/O"):
        jcar_stream_weights(SPAN, weighted)


def test_jcar_settings_use_the_per_stream_mean_on_two_stream_units_only():
    base = ReconSettings.from_config(ReconConfig(iters=7))
    jcar = JcarConfig(enabled=True, w_tokens=0.1, w_image=1.0)
    span = jcar_settings(base, SPAN, _cache(), jcar)
    assert span.reduction == "mean" and dict(span.stream_weights) == {"queries": 0.1, "keys": 1.0}
    assert span.iters == 7
    assert jcar_settings(base, SINGLE, _cache(), jcar) is base

"""FP activation statistics of any SAM, measured the same way for every model (`carsam stats`).

What is measured, over the protocol's passes (per image: one encoder pass, then its prompt boxes decoded):

- **Decoder attentions** (every attention of `mask_decoder.transformer`, in call order), per tensor:
  the three inputs `q_in`, `k_in`, `v_in` (for a token->image attention `q_in` is the token stream with its
  positional encoding, `k_in` the image embedding with its PE and `v_in` the image embedding; the other way
  round for image->token) and the projections `Q`, `K`, `V` (heads merged): `min`, `max`, `absmax`, `rms`
  and `absmax_rms` (= absmax / rms, the peak-to-average ratio that a per-tensor 4-bit grid pays for).
  The softmax probabilities `P`: `below_4bit_step`, the share below 1/15 (one step of a 4-bit grid on
  the softmax's range [0, 1]), and `zero_4bit`, the share below 1/30 (what rounds to 0 on that grid).
  The keys `K`, per channel: Sarle's bimodality coefficient (`carsam.methods.big`), as `bc_max`,
  `bc_median` and `bimodal_channels` (coefficient above BIG's threshold 5/9) of `channels`.
- **Encoder blocks**, per block, for the outputs of `norm1` and `norm2` (LayerNorms) and of `mlp.act`
  (post-GELU): `absmax`, `rms`, and the per-channel outliers: `outlier_ratio` = the largest channel absmax
  over the median channel absmax, and `outlier_channels`, the channels whose absmax exceeds
  `OUTLIER_FACTOR` x the median.

All moments are accumulated in float64 over every call, so the result does not depend on how images
are batched. Decoder tensors are counted once per prompt (an image's keys enter every one of its box
decodes), so images weigh by their prompt count, as in the protocol's passes. Attention tensors are read
through the quantized twins (`quantize_` with every quantizer in FP mode, bit-identical to the original
model), so the model handed in must be such a twin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from carsam.data.coco import CocoBoxPrompts
from carsam.diagnostics.collector import AttentionSite, attention_sites
from carsam.eval.inference import box_predictor, run_image
from carsam.methods.big import BIMODALITY_THRESHOLD, bimodality_from_moments
from carsam.models.architecture import find_encoder_blocks
from carsam.models.quantize import ENCODER_SCOPE
from carsam.quant.state import eval_no_grad

OUTLIER_FACTOR = 10.0  # a channel is an outlier when its absmax exceeds this many times the median channel's
PROB_STEP_4BIT = 1.0 / 15.0  # one step of a 4-bit unsigned grid on [0, 1]
FRAME_COLUMNS = ["scope", "module", "layer", "path", "tensor", "stat", "value"]


@dataclasses.dataclass
class RangeMeter:
    """Running min, max, absmax and sum of squares of a tensor's values (float64)."""

    low: float = float("inf")
    high: float = float("-inf")
    squares: float = 0.0
    count: int = 0

    def add(self, x: Tensor) -> None:
        d = x.detach().double()
        self.low, self.high = min(self.low, float(d.min())), max(self.high, float(d.max()))
        self.squares += float(d.square().sum())
        self.count += d.numel()

    def stats(self) -> dict[str, float]:
        absmax = max(abs(self.low), abs(self.high))
        rms = (self.squares / self.count) ** 0.5 if self.count else float("nan")
        return {"min": self.low, "max": self.high, "absmax": absmax, "rms": rms,
                "absmax_rms": absmax / rms if rms > 0 else float("nan")}


@dataclasses.dataclass
class ChannelMoments:
    """Per-channel power sums `Σx^k`, k = 1..4, of values `(..., C)` (channels last), in float64."""

    sums: Tensor | None = None  # (4, C)
    count: int = 0

    def add(self, x: Tensor) -> None:
        flat = x.detach().double().reshape(-1, x.shape[-1])
        powers = torch.stack([flat.sum(0), flat.square().sum(0), flat.pow(3).sum(0), flat.pow(4).sum(0)])
        self.sums = powers if self.sums is None else self.sums + powers
        self.count += flat.shape[0]

    def bimodality(self) -> Tensor:
        """Sarle's bimodality coefficient per channel `(C,)` float64 (`bimodality_from_moments`)."""
        if self.sums is None:
            raise ValueError("no values were added")
        n = self.count
        mean, m2r, m3r, m4r = (self.sums[k] / n for k in range(4))
        m2 = m2r - mean**2  # central moments from the raw ones
        m3 = m3r - 3 * mean * m2r + 2 * mean**3
        m4 = m4r - 4 * mean * m3r + 6 * mean**2 * m2r - 3 * mean**4
        # a channel constant up to rounding (variance below 1e-12 of its second raw moment) has no spread
        m2 = torch.where(m2 <= 1e-12 * m2r, torch.zeros_like(m2), m2)
        return torch.tensor([bimodality_from_moments(n, float(a), float(b), float(c)) for a, b, c in zip(m2, m3, m4)],
                            dtype=torch.float64)


@dataclasses.dataclass
class ChannelAbsMax:
    """Per-channel absmax of values `(..., C)` (channels last) and an overall range meter."""

    absmax: Tensor | None = None
    meter: RangeMeter = dataclasses.field(default_factory=RangeMeter)

    def add(self, x: Tensor) -> None:
        per_channel = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).double()
        self.absmax = per_channel if self.absmax is None else torch.maximum(self.absmax, per_channel)
        self.meter.add(x)

    def stats(self) -> dict[str, float]:
        if self.absmax is None:
            raise ValueError("no values were added")
        median = float(self.absmax.median())
        ratio = float(self.absmax.max()) / median if median > 0 else float("nan")
        outliers = int((self.absmax > OUTLIER_FACTOR * median).sum())
        stats = self.meter.stats()
        return {"absmax": stats["absmax"], "rms": stats["rms"], "outlier_ratio": ratio,
                "outlier_channels": float(outliers), "channels": float(self.absmax.numel())}


@dataclasses.dataclass
class ProbMeter:
    """Shares of softmax probabilities below one 4-bit step and below half of one."""

    below_step: int = 0
    below_half: int = 0
    count: int = 0

    def add(self, p: Tensor) -> None:
        p = p.detach()
        self.below_step += int((p < PROB_STEP_4BIT).sum())
        self.below_half += int((p < PROB_STEP_4BIT / 2).sum())
        self.count += p.numel()

    def stats(self) -> dict[str, float]:
        return {"below_4bit_step": self.below_step / self.count, "zero_4bit": self.below_half / self.count}


def _merge_heads(x: Tensor) -> Tensor:
    """`(B, h, N, d)` -> `(B, N, h*d)`."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


@dataclasses.dataclass
class _DecoderMeters:
    ranges: dict[str, RangeMeter] = dataclasses.field(
        default_factory=lambda: {t: RangeMeter() for t in ("q_in", "k_in", "v_in", "Q", "K", "V")})
    probs: ProbMeter = dataclasses.field(default_factory=ProbMeter)
    keys: ChannelMoments = dataclasses.field(default_factory=ChannelMoments)


def _inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    """The (q, k, v) an attention was called with, positionally or by keyword."""
    return [*args, *(kwargs[k] for k in ("q", "k", "v") if k in kwargs)]


@contextmanager
def _decoder_hooks(sites: Sequence[AttentionSite], meters: dict[str, _DecoderMeters]) -> Iterator[None]:
    handles = []
    for site in sites:
        m = meters.setdefault(site.path, _DecoderMeters())
        attn: Any = site.attention

        def on_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], m: _DecoderMeters = m) -> None:
            for name, x in zip(("q_in", "k_in", "v_in"), _inputs(args, kwargs)):
                m.ranges[name].add(x)

        def on_scores(module: nn.Module, args: tuple[Tensor, ...], m: _DecoderMeters = m) -> None:
            queries, keys = _merge_heads(args[0]), _merge_heads(args[1].mT)
            m.ranges["Q"].add(queries)
            m.ranges["K"].add(keys)
            m.keys.add(keys)

        def on_probs(module: nn.Module, args: tuple[Tensor, ...], m: _DecoderMeters = m) -> None:
            m.probs.add(args[0])
            m.ranges["V"].add(_merge_heads(args[1]))

        handles += [attn.register_forward_pre_hook(on_inputs, with_kwargs=True),
                    attn.qk_matmul.register_forward_pre_hook(on_scores),
                    attn.pv_matmul.register_forward_pre_hook(on_probs)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


ENCODER_TENSORS = (("norm1", "norm1"), ("norm2", "norm2"), ("gelu", "mlp.act"))  # (tensor name, submodule)


@contextmanager
def _encoder_hooks(sam: nn.Module, meters: dict[tuple[str, str], ChannelAbsMax]) -> Iterator[None]:
    handles = []
    for path, block in find_encoder_blocks(sam.get_submodule(ENCODER_SCOPE)):  # ViT or Hiera blocks
        for name, sub in ENCODER_TENSORS:
            meter = meters.setdefault((f"{ENCODER_SCOPE}.{path}", name), ChannelAbsMax())
            handles.append(block.get_submodule(sub).register_forward_hook(
                lambda module, args, out, meter=meter: meter.add(out)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _decoder_rows(meters: dict[str, _DecoderMeters], sites: Sequence[AttentionSite]) -> list[dict[str, Any]]:
    rows = []
    for site in sites:
        m = meters[site.path]
        base = {"scope": "decoder", "module": site.module, "layer": site.layer, "path": site.path}
        if m.probs.count == 0:
            continue
        for tensor, meter in m.ranges.items():
            rows += [{**base, "tensor": tensor, "stat": s, "value": v} for s, v in meter.stats().items()]
        rows += [{**base, "tensor": "P", "stat": s, "value": v} for s, v in m.probs.stats().items()]
        bc = m.keys.bimodality()
        rows += [{**base, "tensor": "K", "stat": s, "value": v} for s, v in (
            ("bc_max", float(bc.max())), ("bc_median", float(bc.median())),
            ("bimodal_channels", float((bc > BIMODALITY_THRESHOLD).sum())), ("channels", float(bc.numel())))]
    return rows


def _encoder_rows(meters: dict[tuple[str, str], ChannelAbsMax]) -> list[dict[str, Any]]:
    rows = []
    for (path, tensor), meter in meters.items():
        if meter.absmax is None:
            continue
        layer = int(path.rsplit(".", 1)[1])
        rows += [{"scope": "encoder", "module": "encoder.block", "layer": layer, "path": path, "tensor": tensor,
                  "stat": s, "value": v} for s, v in meter.stats().items()]
    return rows


def collect_statistics(sam: nn.Module, dataset: CocoBoxPrompts, image_ids: Sequence[int],
                       max_boxes_per_batch: int = 64) -> pd.DataFrame:
    """The statistics of the module docstring over `image_ids` of `dataset` (its prompts decoded), in long
    format: columns `FRAME_COLUMNS`, one row per (attention or encoder block, tensor, statistic).

    `sam` must carry the attention twins in FP mode (`quantize_` then nothing else); its mode is left as is.
    """
    if not image_ids:
        raise ValueError("collect_statistics needs at least one image")
    sites = attention_sites(sam, ("decoder",))
    decoder: dict[str, _DecoderMeters] = {}
    encoder: dict[tuple[str, str], ChannelAbsMax] = {}
    predictor = box_predictor(sam, max_boxes_per_batch)
    with eval_no_grad(sam), _decoder_hooks(sites, decoder), _encoder_hooks(sam, encoder):
        for image_id in image_ids:
            run_image(predictor, dataset, image_id)
    frame = pd.DataFrame(_decoder_rows(decoder, sites) + _encoder_rows(encoder), columns=FRAME_COLUMNS)
    if frame.empty or not np.isfinite(frame["value"].dropna()).all():
        bad = frame[~np.isfinite(frame["value"])]["path"].unique()[:3] if not frame.empty else []
        raise ValueError(f"statistics are empty or not finite (first: {list(bad)}); the model's activations "
                         "overflow or the images had no prompts")
    return frame


__all__ = ["FRAME_COLUMNS", "OUTLIER_FACTOR", "PROB_STEP_4BIT", "ChannelAbsMax", "ChannelMoments", "ProbMeter",
           "RangeMeter", "collect_statistics"]

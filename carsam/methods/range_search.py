"""Range-search baselines: pick each quantizer's range from calibration statistics, no reconstruction.

- `omse` (OMSE, Choukroun et al. 2019): weights per output channel and activations per tensor both use
  the `mse` observer, i.e. the clipping range that minimises the MSE between a tensor and its
  fake-quantized version (weights: on the weight itself; activations: on the calibration activations).
- `percentile`: activations (every per-tensor quantizer, MatMul operands and softmax probabilities
  included) are clipped at the `ACT_PERCENTILE`-th / `(100 - ACT_PERCENTILE)`-th percentiles of each
  calibration batch, averaged over batches. Weights keep the per-channel `mse` search (the repository's
  RTN default), so `percentile` differs from `rtn` and from `omse` only in its activation estimator and
  each comparison isolates one choice.

Both methods own their observers: `config.quant.w_observer` / `a_observer` and any observer keys in
`config.quant.overrides` are replaced (other overrides, e.g. bits or `enabled`, are kept). The
observers actually built are counted from the quantized model and returned in the details, so they are
written into the run record even though the record's `config.quant` shows the configured ones.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from carsam.methods.calibrate import calibrate_, calibration_counts
from carsam.methods.registry import Method, register
from carsam.models.quantize import QuantConfig, quantize_
from carsam.quant.observers import PercentileObserver, build_observer
from carsam.quant.quantizers import UniformQuantizer, iter_quantizers

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from carsam.config import RunConfig
    from carsam.data.coco import CocoBoxPrompts
    from carsam.run_context import RunContext

logger = logging.getLogger(__name__)

ACT_PERCENTILE = 99.99  # percentile method: activations clipped at the 99.99th / 0.01th percentiles
OBSERVER_KEYS = ("w_observer", "a_observer")


def with_observers(quant: QuantConfig, w_observer: str, a_observer: str) -> QuantConfig:
    """`quant` with its observers replaced and observer keys removed from its overrides.

    Overrides that set nothing but observers are dropped; the log names every replaced setting (a
    warning for overrides, which only an experiment sets).
    """
    replaced = [f"{k}={getattr(quant, k)}" for k, v in zip(OBSERVER_KEYS, (w_observer, a_observer))
                if getattr(quant, k) != v]
    if replaced:  # the base observers are RTN's defaults unless an experiment sets them: not worth a warning
        logger.info("observers are set by the method (w=%s, a=%s); replacing %s", w_observer, a_observer,
                    ", ".join(replaced))
    dropped, overrides = [], []
    for glob, values in quant.overrides:
        dropped += [f"overrides[{glob}].{k}={values[k]}" for k in OBSERVER_KEYS if k in values]
        kept = {k: v for k, v in values.items() if k not in OBSERVER_KEYS}
        if kept:
            overrides.append((glob, kept))
    if dropped:
        logger.warning("observers are set by the method (w=%s, a=%s); ignoring %s", w_observer, a_observer,
                       ", ".join(dropped))
    return dataclasses.replace(quant, w_observer=w_observer, a_observer=a_observer, overrides=tuple(overrides))


def is_weight_quantizer(quantizer: UniformQuantizer) -> bool:
    """Weight quantizers are per channel; activation (and MatMul operand) quantizers are per tensor."""
    return quantizer.ch_axis is not None


def uniform_quantizers(sam: Sam) -> list[UniformQuantizer]:
    """Every `UniformQuantizer` of `sam` (other quantizer kinds carry no range observer)."""
    return [q for _, q in iter_quantizers(sam) if isinstance(q, UniformQuantizer)]


def set_act_percentile_(sam: Sam, percentile: float) -> int:
    """Give every per-tensor percentile observer of `sam` the clipping `percentile`; returns the count."""
    count = 0
    for quantizer in uniform_quantizers(sam):
        if not is_weight_quantizer(quantizer) and quantizer.observer_name == "percentile":
            quantizer.observer = build_observer("percentile", percentile=percentile, ch_axis=None,
                                                seed=quantizer.observer.seed)
            count += 1
    return count


def observers_used(sam: Sam) -> dict[str, dict[str, int]]:
    """How many weight and activation quantizers of `sam` use each observer, e.g.
    `{"weight": {"mse": 72}, "activation": {"mse": 72}}`."""
    counts: dict[str, Counter[str]] = {"weight": Counter(), "activation": Counter()}
    for quantizer in uniform_quantizers(sam):
        counts["weight" if is_weight_quantizer(quantizer) else "activation"][quantizer.observer_name] += 1
    return {kind: dict(sorted(c.items())) for kind, c in counts.items()}


def act_percentiles(sam: Sam) -> list[float]:
    """The distinct clipping percentiles of the per-tensor percentile observers of `sam`, sorted."""
    return sorted({q.observer.percentile for q in uniform_quantizers(sam)
                   if not is_weight_quantizer(q) and isinstance(q.observer, PercentileObserver)})


def quantize_and_calibrate(sam: Sam, calib: CocoBoxPrompts, config: RunConfig, context: RunContext, w_observer: str,
                           a_observer: str, percentile: float | None = None) -> dict[str, Any]:
    """Quantize `sam` per `config.quant` with the given observers, calibrate it on `calib`, and return
    the details: observers named and counted, the percentile when used, quantizer and image counts."""
    quantize_(sam, with_observers(config.quant, w_observer, a_observer))
    if percentile is not None:
        set_act_percentile_(sam, percentile)
    used = observers_used(sam)  # read before calibration: observers keep their type, only their data resets
    percentiles = act_percentiles(sam)
    calibrate_(sam, calib, progress=context.progress, source=context.embeddings)
    details: dict[str, Any] = {"w_observer": w_observer, "a_observer": a_observer, "observers_used": used,
                               **calibration_counts(sam, calib)}
    if percentiles:
        details["act_percentile"] = percentiles[0] if len(percentiles) == 1 else percentiles
    return details


def apply_omse(sam: Sam, calib: CocoBoxPrompts, config: RunConfig, context: RunContext) -> dict[str, Any]:
    """OMSE: MSE-searched ranges for weights (per channel) and activations (per tensor)."""
    return quantize_and_calibrate(sam, calib, config, context, w_observer="mse", a_observer="mse")


def apply_percentile(sam: Sam, calib: CocoBoxPrompts, config: RunConfig, context: RunContext) -> dict[str, Any]:
    """Percentile: MSE-searched per-channel weights, activations clipped at `ACT_PERCENTILE`."""
    return quantize_and_calibrate(sam, calib, config, context, w_observer="mse", a_observer="percentile",
                                  percentile=ACT_PERCENTILE)


register(Method("omse", apply_omse, summary="OMSE: MSE-searched weight and activation ranges, no reconstruction"))
register(Method("percentile", apply_percentile,
                summary=f"MSE-searched weights, activations clipped at the {ACT_PERCENTILE} percentile"))

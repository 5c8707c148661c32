"""Block-reconstruction baselines: `brecq` (AdaRound, activations fixed) and `qdrop` (+ LSQ + QDrop).

Both methods quantize per `config.quant`, calibrate every range (`calibrate_`), then reconstruct the
units of `config.recon` one after the other (image-encoder blocks first when the encoder is quantized
and `recon.encoder_grouping` is not `none`, then the decoder units of `recon.grouping`, in data-flow
order). For each unit:

1. every AdaRound layer reconstructed so far is switched to hard rounding, so that
2. the unit's cache (`build_unit_cache`, built right before its reconstruction) sees the earlier units
   as they will be evaluated when `recon.inputs == "quantized"` (BRECQ's and QDrop's choice);
3. every quantized weight of the unit gets an `AdaRoundQuantizer`; `qdrop` also makes the scale of
   each of the unit's uniform activation quantizers learnable (LSQ) and sets QDrop's keep probability
   `recon.quant_prob` on all its activation quantizers (log quantizers included);
4. `reconstruct_unit` (the Lightning stage) optimises the unit against its FP outputs;
5. the unit goes back to hard rounding and `quant_prob = 1`.

`brecq` keeps the activation quantizers as calibrated (QUANTIZED, fixed steps, `quant_prob = 1`) and
learns only the rounding. At the end every AdaRound layer is baked (`finalize_adaround_`), QDrop's
probability is reset to 1 on *every* quantizer and `assert_eval_ready` is checked, so no FP path leaks
into evaluation (the PTQ4SAM evaluation bug). The neck convolutions of the encoder belong to no unit:
they keep RTN rounding.

Records: `details["recon"]` holds the settings, the recipe (what was learned, QDrop p), the cache size,
and per unit its `stage` settings, the first and last loss of each stream (`out`, or `queries`/`keys`,
plus `round` and `total`) and a curve subsampled to at most `recon.curve_points` points.

Stage cache: the image-encoder units depend on no decoder knob, so inside a run with the stage cache
on (`carsam.prepared_cache`) their result (AdaRound alphas, learned steps, records, RNG state after)
is stored after they are reconstructed and restored by a later run whose encoder state, settings,
recipe, calibration set, code and RNG state are the same; restored unit records carry `"cached": true`
(their `seconds` are those of the run that computed them). Bit-identical to reconstructing (tested).

`reconstruct_model_` also takes, for callers such as JCAR: `settings_for(unit, cache)`, the stage
settings of each decoder unit (e.g. its stream weights and reduction; default `recon_settings(recon)`;
encoder units always get `recon_settings(recon)`), and `track_interference`: the quantized model's
per-step errors (`carsam.recon.interference.boundary_errors` on `interference_images` calibration
images) once before the first decoder unit and after each reconstructed decoder unit, with every
AdaRound layer in hard rounding, recorded as `interference: [{"after": "start" | unit name, "errors":
{step: {"queries": mse, "keys": mse}}}, ...]`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from carsam.methods.calibrate import calibrate_
from carsam.methods.registry import Method, register
from carsam.models.quantize import quantize_
from carsam.quant.adaround import adaround_modules, enable_adaround_, finalize_adaround_, set_soft_rounding
from carsam.quant.modules import quantized_weight_modules
from carsam.quant.quantizers import (QuantizerBase, UniformQuantizer, assert_eval_ready, iter_quantizers,
                                     set_quant_prob)
from carsam.recon.cache import UnitCache, build_unit_cache
from carsam.prepared_cache import active_prepared_store, state_sha256
from carsam.recon.interference import FpTraces, boundary_errors
from carsam.recon.stage import ReconResult, ReconSettings, reconstruct_unit
from carsam.recon.units import ReconUnit, find_units
from carsam.stage_cache import encoder_fields

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from carsam.config import ReconConfig, RunConfig
    from carsam.data.coco import CocoBoxPrompts

SettingsFor = Callable[[ReconUnit, UnitCache], ReconSettings]
INTERFERENCE_START = "start"

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class UnitRecipe:
    """What a method makes learnable in each unit: AdaRound always; LSQ steps and QDrop for `qdrop`.

    learn_act_scales: make the unit's uniform activation steps learnable (LSQ).
    quant_prob: QDrop keep probability on the unit's activation quantizers while it is optimised.
    """

    learn_act_scales: bool = False
    quant_prob: float = 1.0


def recon_settings(recon: ReconConfig) -> ReconSettings:
    """The stage's hyper-parameters from the config's `recon` section (beta 20 -> 2, QDrop's Lp loss)."""
    return ReconSettings(iters=recon.iters, alpha_lr=recon.alpha_lr, scale_lr=recon.scale_lr,
                         round_weight=recon.round_weight, warmup=recon.warmup, seed=recon.seed)


def recon_units(sam: nn.Module, recon: ReconConfig, decoder_grouping: str | None = None) -> list[ReconUnit]:
    """The units to reconstruct, in data-flow order: encoder blocks (unless `none`), then the decoder units
    of `decoder_grouping` (None: `recon.grouping`)."""
    units = [] if recon.encoder_grouping == "none" else find_units(sam, recon.encoder_grouping)
    return units + find_units(sam, decoder_grouping or recon.grouping)


def weight_quantizer_ids(module: nn.Module) -> set[int]:
    """Ids of the quantizers held as `weight_quantizer` by the weight layers inside `module`."""
    return {id(layer.weight_quantizer) for _, layer in quantized_weight_modules(module)}


def activation_quantizers(module: nn.Module) -> list[QuantizerBase]:
    """The quantizers of `module` that quantize activations or MatMul operands (not weights)."""
    weights = weight_quantizer_ids(module)
    return [q for _, q in iter_quantizers(module) if id(q) not in weights]


def roundable_layers(module: nn.Module) -> list[nn.Module]:
    """The weight layers of `module` whose weight is quantized by a `UniformQuantizer` (AdaRound targets)."""
    layers = quantized_weight_modules(module)
    return [layer for _, layer in layers if isinstance(layer.weight_quantizer, UniformQuantizer)]


def prepare_unit_(module: nn.Module, recipe: UnitRecipe) -> dict[str, int]:
    """Enable AdaRound on the unit's weights and, per `recipe`, LSQ steps and QDrop; returns the counts."""
    layers = roundable_layers(module)
    for layer in layers:
        enable_adaround_(layer)  # type: ignore[arg-type]
    acts = activation_quantizers(module)
    learned = 0
    if recipe.learn_act_scales:
        for quantizer in acts:
            if isinstance(quantizer, UniformQuantizer):
                quantizer.make_scale_learnable()
                learned += 1
    for quantizer in acts:
        quantizer.quant_prob = recipe.quant_prob
    return {"adaround_layers": len(layers), "learned_scales": learned, "act_quantizers": len(acts)}


def has_work(module: nn.Module, recipe: UnitRecipe) -> bool:
    """Whether a unit's `module` has anything to reconstruct under `recipe` (quantized weights, or
    activation steps to learn)."""
    return bool(roundable_layers(module)) or bool(recipe.learn_act_scales and activation_quantizers(module))


def subsample(values: list[float], points: int) -> list[float]:
    """At most `points` evenly spaced entries of `values`, always keeping the first and the last."""
    if len(values) <= points:
        return list(values)
    step = (len(values) - 1) / (points - 1)
    return [values[round(i * step)] for i in range(points)]


def unit_record(unit: ReconUnit, result: ReconResult, counts: dict[str, int], cache_mib: float,
                points: int) -> dict[str, Any]:
    """What the run record keeps of one unit's reconstruction."""
    return {"unit": unit.name, "kind": unit.kind, **counts, "cache_mib": round(cache_mib, 3), "steps": result.steps,
            "seconds": round(result.seconds, 3),
            "first": {k: v[0] for k, v in result.curve.items() if v},
            "last": {k: v[-1] for k, v in result.curve.items() if v},
            "curve": {k: subsample(v, points) for k, v in result.curve.items()}}


def reconstruct_unit_in_model_(sam: nn.Module, unit: ReconUnit, calib: CocoBoxPrompts, recon: ReconConfig,
                               recipe: UnitRecipe, settings_for: SettingsFor | None = None) -> dict[str, Any] | None:
    """Steps 1-5 of the module docstring for one unit; None (and a log line) if it has nothing quantized.

    settings_for: the unit's stage settings from the unit and its cache (None: `recon_settings(recon)`).
    """
    module = unit.module(sam)
    if not has_work(module, recipe):
        logger.info("recon %s: no quantized weight, skipped", unit.name)
        return None
    set_soft_rounding(sam, False)
    cache = build_unit_cache(sam, unit, calib, inputs=recon.inputs)
    counts = prepare_unit_(module, recipe)
    settings = recon_settings(recon) if settings_for is None else settings_for(unit, cache)
    result = reconstruct_unit(sam, unit, cache, settings)
    set_soft_rounding(module, False)
    set_quant_prob(module, 1.0)
    return {**unit_record(unit, result, counts, cache.nbytes / 2**20, recon.curve_points),
            "stage": dataclasses.asdict(settings)}


def finish_(sam: nn.Module) -> int:
    """Bake every AdaRound layer, reset QDrop's probability on every quantizer, assert eval-readiness.

    Returns how many layers were baked.
    """
    baked = len(adaround_modules(sam))
    finalize_adaround_(sam)
    set_quant_prob(sam, 1.0, weights=True)
    assert_eval_ready(sam)
    return baked


def interference_entry(sam: nn.Module, calib: CocoBoxPrompts, after: str, images: int,
                       fp_traces: FpTraces | None = None) -> dict[str, Any]:
    """`{"after": after, "errors": boundary_errors(...)}` with every AdaRound layer in hard rounding; the
    FP side comes from `fp_traces` when it holds it (one per reconstruction, see `FpTraces`).

    QDrop needs no reset here: `boundary_errors` runs in eval mode, where `quant_prob` has no effect
    (and each reconstructed unit was already set back to `quant_prob = 1`).
    """
    set_soft_rounding(sam, False)
    return {"after": after, "errors": boundary_errors(sam, calib, images, fp_traces)}


def reconstruct_units_(sam: nn.Module, calib: CocoBoxPrompts, recon: ReconConfig, recipe: UnitRecipe,
                       units: list[ReconUnit], settings_for: SettingsFor | None = None,
                       interference: list[dict[str, Any]] | None = None, interference_images: int = 4
                       ) -> list[dict[str, Any]]:
    """Reconstruct `units` in order (`reconstruct_unit_in_model_`); returns their records. With an
    `interference` list, the per-step errors are appended before the first unit (if the list is empty)
    and after each reconstructed one."""
    records: list[dict[str, Any]] = []
    fp_traces = FpTraces()
    for unit in units:
        if interference is not None and not interference:
            interference.append(interference_entry(sam, calib, INTERFERENCE_START, interference_images, fp_traces))
        record = reconstruct_unit_in_model_(sam, unit, calib, recon, recipe, settings_for)
        if record is not None:
            records.append(record)
            if interference is not None:
                interference.append(interference_entry(sam, calib, unit.name, interference_images, fp_traces))
    return records


def rebuild_reconstructed_(sam: nn.Module, units: list[ReconUnit], recipe: UnitRecipe,
                           records: list[dict[str, Any]]) -> None:
    """The module structure `reconstruct_units_` leaves, from its records: each reconstructed unit prepared
    per `recipe` (AdaRound quantizers, learnable steps) and set back to hard rounding and `quant_prob = 1`.
    Values come from a state dict after."""
    by_name = {unit.name: unit for unit in units}
    for record in records:
        module = by_name[record["unit"]].module(sam)
        prepare_unit_(module, recipe)
        set_soft_rounding(module, False)
        set_quant_prob(module, 1.0)


def encoder_stage_fields(sam: nn.Module, recon: ReconConfig, recipe: UnitRecipe,
                         units: list[ReconUnit]) -> dict[str, Any]:
    """What reconstructing the encoder units depends on besides the calibration set, code and RNG state:
    the encoder's current state (weights, qparams, quantizer modes), architecture and preprocessing, the
    stage settings, the input source, the recipe and the units."""
    return {"encoder_state": state_sha256(sam.image_encoder), "encoder": encoder_fields(sam),
            "settings": dataclasses.asdict(recon_settings(recon)), "inputs": recon.inputs,
            "curve_points": recon.curve_points, "recipe": dataclasses.asdict(recipe), "units": [u.name for u in units]}


def reconstruct_encoder_units_(sam: nn.Module, calib: CocoBoxPrompts, recon: ReconConfig, recipe: UnitRecipe,
                               units: list[ReconUnit]) -> list[dict[str, Any]]:
    """`reconstruct_units_` on the image-encoder units, through the prepared-model cache when a run has one
    (`carsam.prepared_cache`: restored when the encoder, settings, recipe, calibration set, code and RNG
    state are those of a stored reconstruction). Their records carry `"cached": True` when restored."""
    store = active_prepared_store()
    if store is None or not any(has_work(unit.module(sam), recipe) for unit in units):
        return reconstruct_units_(sam, calib, recon, recipe, units)
    stored, restored = store.prepare(sam, calib, "recon_encoder", encoder_stage_fields(sam, recon, recipe, units),
                                     lambda: {"units": reconstruct_units_(sam, calib, recon, recipe, units)},
                                     lambda details: rebuild_reconstructed_(sam, units, recipe, details["units"]),
                                     scope=sam.image_encoder)
    return [{**r, "cached": True} for r in stored["units"]] if restored else stored["units"]


def reconstruct_model_(sam: nn.Module, calib: CocoBoxPrompts, recon: ReconConfig, recipe: UnitRecipe,
                       units: list[ReconUnit] | None = None, *, settings_for: SettingsFor | None = None,
                       track_interference: bool | None = None, interference_images: int | None = None
                       ) -> dict[str, Any]:
    """Reconstruct `units` (default: `recon_units(sam, recon)`) of a calibrated `sam` in order, then `finish_`.

    The image-encoder units come first and use `recon_settings(recon)`; with the stage cache on they are
    restored from it when stored (`reconstruct_encoder_units_`). settings_for: per-unit stage settings of
    the decoder units (None: `recon_settings(recon)`); track_interference: record the per-step errors on
    `interference_images` images before and after the decoder units (module docstring; None:
    `recon.track_interference` / `recon.interference_images`). Returns the `recon` record: settings,
    per-unit records, totals and the largest unit cache, plus `interference` when tracked.
    """
    units = recon_units(sam, recon) if units is None else units
    track_interference = recon.track_interference if track_interference is None else track_interference
    interference_images = recon.interference_images if interference_images is None else interference_images
    encoder_units = [u for u in units if u.in_encoder]
    if units[:len(encoder_units)] != encoder_units:
        raise ValueError("the image-encoder units must come before the decoder units")
    start = time.perf_counter()
    records = reconstruct_encoder_units_(sam, calib, recon, recipe, encoder_units)
    interference: list[dict[str, Any]] = []
    records += reconstruct_units_(sam, calib, recon, recipe, units[len(encoder_units):], settings_for,
                                  interference if track_interference else None, interference_images)
    baked = finish_(sam)
    seconds = time.perf_counter() - start
    logger.info("reconstructed %d units (%d layers baked) in %.1fs", len(records), baked, seconds)
    summary = {"settings": {**dataclasses.asdict(recon), "stage": dataclasses.asdict(recon_settings(recon))},
               "recipe": dataclasses.asdict(recipe),
               "num_units": len(records), "baked_layers": baked, "seconds": round(seconds, 3),
               "max_cache_mib": max((r["cache_mib"] for r in records), default=0.0), "units": records}
    return {**summary, "interference": interference} if track_interference else summary


def quantize_calibrate_(sam: Sam, calib: CocoBoxPrompts, config: RunConfig) -> dict[str, Any]:
    """Quantize per `config.quant` and calibrate every range on `calib` (RTN's starting point)."""
    quantize_(sam, config.quant)
    calibrate_(sam, calib)
    return {"num_quantizers": sum(1 for _ in iter_quantizers(sam)), "calib_images": len(calib)}


def qdrop_recipe(config: RunConfig) -> UnitRecipe:
    """QDrop's per-unit recipe: learned activation steps and keep probability `config.recon.quant_prob`."""
    return UnitRecipe(learn_act_scales=True, quant_prob=config.recon.quant_prob)


def apply_brecq(sam: Sam, calib: CocoBoxPrompts, config: RunConfig) -> dict[str, Any]:
    """BRECQ: RTN ranges, then AdaRound unit by unit with the activation quantizers fixed."""
    details = quantize_calibrate_(sam, calib, config)
    details["recon"] = reconstruct_model_(sam, calib, config.recon, UnitRecipe())
    return details


def apply_qdrop(sam: Sam, calib: CocoBoxPrompts, config: RunConfig) -> dict[str, Any]:
    """QDrop: RTN ranges, then AdaRound + LSQ activation steps + QDrop (p = `recon.quant_prob`) per unit."""
    details = quantize_calibrate_(sam, calib, config)
    details["recon"] = reconstruct_model_(sam, calib, config.recon, qdrop_recipe(config))
    return details


register(Method("brecq", apply_brecq, summary="BRECQ: AdaRound block reconstruction, activations fixed"))
register(Method("qdrop", apply_qdrop, summary="QDrop: AdaRound + LSQ activation steps + random drop (p=0.5)"))

__all__ = ["INTERFERENCE_START", "SettingsFor", "UnitRecipe", "activation_quantizers", "apply_brecq", "apply_qdrop",
           "encoder_stage_fields", "finish_", "has_work", "interference_entry", "prepare_unit_", "qdrop_recipe",
           "quantize_calibrate_", "rebuild_reconstructed_", "recon_settings", "recon_units",
           "reconstruct_encoder_units_", "reconstruct_model_", "reconstruct_units_", "roundable_layers", "subsample"]

"""The reconstruction driver: the per-unit loop of BRECQ, QDrop, PTQ4SAM and CAR-SAM, and its record.

`reconstruct_model_` reconstructs the units of `config.recon` of a quantized, calibrated model one
after the other (image-encoder blocks first when the encoder is quantized and `recon.encoder_grouping`
is not `none`, then the decoder units of `recon.grouping` or a method's own, in data-flow order). What a
method makes learnable in each unit is its `UnitRecipe`. For each unit:

1. every AdaRound layer reconstructed so far is switched to hard rounding, so that
2. the unit's block I/O (`capture_block_io`, captured right before its reconstruction) sees the earlier units
   as they will be evaluated when `recon.inputs == "quantized"` (BRECQ's and QDrop's choice);
3. every quantized weight of the unit gets an `AdaRoundQuantizer`; QDrop's recipe also makes the scale of
   each of the unit's uniform activation quantizers learnable (LSQ) and sets QDrop's keep probability
   `recon.quant_prob` on all its activation quantizers (log quantizers included);
4. `reconstruct_unit` (the Lightning stage) optimises the unit against its FP outputs;
5. the unit goes back to hard rounding and `quant_prob = 1`.

BRECQ's recipe keeps the activation quantizers as calibrated (QUANTIZED, fixed steps, `quant_prob = 1`) and
learns only the rounding. At the end every AdaRound layer is baked (`finalize_adaround_`), QDrop's
probability is reset to 1 on *every* quantizer and `assert_eval_ready` is checked, so no FP path leaks
into evaluation (the PTQ4SAM evaluation bug). The neck convolutions of the encoder belong to no unit:
they keep RTN rounding.

Records: the `ReconReport` (`details["recon"]` in the run record) holds the settings, the recipe (what was
learned, QDrop p), the largest block I/O, and per unit its `stage` settings, the first and last loss of each
stream (`out`, or `queries`/`keys`, plus `round` and `total`) and a curve subsampled to at most
`recon.curve_points` points.

Stage cache: the image-encoder units depend on no decoder knob, so with the run's prepared-model store
(`RunContext.prepared`, `carsam.cache.prepared`) their result (AdaRound alphas, learned steps, records, RNG state after)
is stored after they are reconstructed and restored by a later run whose encoder state, settings,
recipe, calibration set, code and RNG state are the same; restored unit records carry `"cached": true`
(their `seconds` are those of the run that computed them). Bit-identical to reconstructing (tested).

`reconstruct_model_` also takes, for callers such as JCAR: `settings_for(unit, block_io)`, the stage
settings of each decoder unit (e.g. its stream weights and reduction; default `ReconSettings.from_config(recon)`;
encoder units always get `ReconSettings.from_config(recon)`), and `track_interference`: the quantized model's
per-step errors (`carsam.recon.interference.boundary_errors` on `interference_images` calibration
images) once before the first decoder unit and after each reconstructed decoder unit, with every
AdaRound layer in hard rounding, recorded as `interference: [{"after": "start" | unit name, "errors":
{step: {"queries": mse, "keys": mse}}}, ...]`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from carsam.cache.embeddings import encoder_fields
from carsam.cache.prepared import state_sha256
from carsam.eval.inference import EmbeddingSource
from carsam.models.finite import check_finite_
from carsam.quant.adaround import adaround_modules, enable_adaround_, finalize_adaround_, set_soft_rounding
from carsam.quant.modules import quantized_weight_modules
from carsam.quant.quantizers import QuantizerBase, UniformQuantizer, iter_quantizers
from carsam.quant.state import assert_eval_ready, set_quant_prob
from carsam.recon.block_io import BlockIO, capture_block_io
from carsam.recon.interference import FpTraces, boundary_errors
from carsam.recon.progress import ReconProgress
from carsam.recon.stage import ReconResult, ReconSettings, reconstruct_unit
from carsam.recon.units import ReconUnit, find_units
from carsam.run_context import RunContext

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from carsam.config import ReconConfig
    from carsam.data.coco import CocoBoxPrompts

SettingsFor = Callable[[ReconUnit, BlockIO], ReconSettings]
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


@dataclasses.dataclass
class ReconReport:
    """What one reconstruction did, as `reconstruct_model_` hands it to its method and the run's diagnostics.

    settings: the `recon` config and the stage settings; units: one record per reconstructed unit
    (`unit_record`: counts, first/last stream losses, curves, stage settings, `cached` when restored);
    interference: the per-step error entries (`interference_entry`), None when not tracked.
    `record()` is its JSON form in the run record (`details.recon`).
    """

    settings: dict[str, Any]
    recipe: UnitRecipe
    units: list[dict[str, Any]]
    baked_layers: int
    seconds: float
    interference: list[dict[str, Any]] | None = None

    @property
    def max_block_io_mib(self) -> float:
        """The largest block I/O of a unit, in MiB."""
        return max((r["block_io_mib"] for r in self.units), default=0.0)

    def record(self) -> dict[str, Any]:
        """The JSON-ready form kept under `details.recon` (`interference` only when tracked)."""
        out = {"settings": self.settings, "recipe": dataclasses.asdict(self.recipe), "num_units": len(self.units),
               "baked_layers": self.baked_layers, "seconds": self.seconds, "max_block_io_mib": self.max_block_io_mib,
               "units": self.units}
        return out if self.interference is None else {**out, "interference": self.interference}


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


def unit_record(unit: ReconUnit, result: ReconResult, counts: dict[str, int], block_io_mib: float,
                points: int) -> dict[str, Any]:
    """What the run record keeps of one unit's reconstruction."""
    return {"unit": unit.name, "kind": unit.kind, **counts, "block_io_mib": round(block_io_mib, 3),
            "steps": result.steps, "seconds": round(result.seconds, 3),
            "first": {k: v[0] for k, v in result.curve.items() if v},
            "last": {k: v[-1] for k, v in result.curve.items() if v},
            "curve": {k: subsample(v, points) for k, v in result.curve.items()}}


def reconstruct_unit_in_model_(sam: nn.Module, unit: ReconUnit, calib: CocoBoxPrompts, recon: ReconConfig,
                               recipe: UnitRecipe, settings_for: SettingsFor | None = None,
                               source: EmbeddingSource | None = None,
                               progress: ReconProgress | None = None) -> dict[str, Any] | None:
    """Steps 1-5 of the module docstring for one unit; None (and a log line) if it has nothing quantized.

    settings_for: the unit's stage settings from the unit and its block I/O (None: `ReconSettings.from_config(recon)`);
    source: where the block-I/O passes get image embeddings (the run's embedding store; None: encode);
    progress: the run's progress bars (None: none).
    """
    module = unit.module(sam)
    if not has_work(module, recipe):
        logger.info("recon %s: no quantized weight, skipped", unit.name)
        if progress is not None:
            progress.skip()
        return None
    set_soft_rounding(sam, False)
    block_io = capture_block_io(sam, unit, calib, inputs=recon.inputs, source=source,
                                dtype=None if recon.cache_dtype == "float32" else getattr(torch, recon.cache_dtype),
                                max_boxes=recon.max_boxes_per_step)
    counts = prepare_unit_(module, recipe)
    settings = ReconSettings.from_config(recon) if settings_for is None else settings_for(unit, block_io)
    bar = contextlib.nullcontext(None) if progress is None else progress.unit(unit.name, settings.iters)
    with bar as on_step:
        result = reconstruct_unit(sam, unit, block_io, settings, on_step)
    set_soft_rounding(module, False)
    set_quant_prob(module, 1.0)
    check_finite_(module, f"reconstruction of unit {unit.name}")
    return {**unit_record(unit, result, counts, block_io.nbytes / 2**20, recon.curve_points),
            "block_io_samples": len(block_io), "block_io_max_batch": block_io.max_batch,
            "stage": dataclasses.asdict(settings)}


def finish_(sam: nn.Module) -> int:
    """Bake every AdaRound layer, reset QDrop's probability on every quantizer, assert eval-readiness.

    Returns how many layers were baked.
    """
    baked = len(adaround_modules(sam))
    finalize_adaround_(sam)
    check_finite_(sam, "rounding (AdaRound's bake)")
    set_quant_prob(sam, 1.0, weights=True)
    assert_eval_ready(sam)
    return baked


def interference_entry(sam: nn.Module, calib: CocoBoxPrompts, after: str, images: int,
                       fp_traces: FpTraces | None = None, source: EmbeddingSource | None = None) -> dict[str, Any]:
    """`{"after": after, "errors": boundary_errors(...)}` with every AdaRound layer in hard rounding; the
    FP side comes from `fp_traces` when it holds it (one per reconstruction, see `FpTraces`).

    QDrop needs no reset here: `boundary_errors` runs in eval mode, where `quant_prob` has no effect
    (and each reconstructed unit was already set back to `quant_prob = 1`).
    """
    set_soft_rounding(sam, False)
    return {"after": after, "errors": boundary_errors(sam, calib, images, fp_traces, source)}


def reconstruct_units_(sam: nn.Module, calib: CocoBoxPrompts, recon: ReconConfig, recipe: UnitRecipe,
                       units: list[ReconUnit], settings_for: SettingsFor | None = None,
                       interference: list[dict[str, Any]] | None = None, interference_images: int = 4,
                       source: EmbeddingSource | None = None,
                       progress: ReconProgress | None = None) -> list[dict[str, Any]]:
    """Reconstruct `units` in order (`reconstruct_unit_in_model_`); returns their records. With an
    `interference` list, the per-step errors are appended before the first unit (if the list is empty)
    and after each reconstructed one. `source`, `progress`: see `reconstruct_unit_in_model_`."""
    records: list[dict[str, Any]] = []
    fp_traces = FpTraces()
    for unit in units:
        if interference is not None and not interference:
            interference.append(interference_entry(sam, calib, INTERFERENCE_START, interference_images, fp_traces,
                                                   source))
        record = reconstruct_unit_in_model_(sam, unit, calib, recon, recipe, settings_for, source, progress)
        if record is not None:
            records.append(record)
            if interference is not None:
                interference.append(interference_entry(sam, calib, unit.name, interference_images, fp_traces, source))
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


def encoder_stage_fields(sam: Sam, recon: ReconConfig, recipe: UnitRecipe,
                         units: list[ReconUnit]) -> dict[str, Any]:
    """What reconstructing the encoder units depends on besides the calibration set, code and RNG state:
    the encoder's current state (weights, qparams, quantizer modes), architecture and preprocessing, the
    stage settings, the input source, the recipe and the units."""
    return {"encoder_state": state_sha256(sam.image_encoder), "encoder": encoder_fields(sam),
            "settings": dataclasses.asdict(ReconSettings.from_config(recon)), "inputs": recon.inputs,
            "cache_dtype": recon.cache_dtype,
            "curve_points": recon.curve_points, "recipe": dataclasses.asdict(recipe), "units": [u.name for u in units]}


def reconstruct_encoder_units_(sam: Sam, calib: CocoBoxPrompts, recon: ReconConfig, recipe: UnitRecipe,
                               units: list[ReconUnit], context: RunContext,
                               progress: ReconProgress | None = None) -> list[dict[str, Any]]:
    """`reconstruct_units_` on the image-encoder units, through the run's prepared-model store when it has
    one (`context.prepared`, `carsam.cache.prepared`: restored when the encoder, settings, recipe,
    calibration set, code and RNG state are those of a stored reconstruction). Their records carry
    `"cached": True` when restored."""
    store, source = context.prepared, context.embeddings
    if store is None or not any(has_work(unit.module(sam), recipe) for unit in units):
        return reconstruct_units_(sam, calib, recon, recipe, units, source=source, progress=progress)
    stored, restored = store.prepare(sam, calib, "recon_encoder", encoder_stage_fields(sam, recon, recipe, units),
                                     lambda: {"units": reconstruct_units_(sam, calib, recon, recipe, units,
                                                                          source=source, progress=progress)},
                                     lambda details: rebuild_reconstructed_(sam, units, recipe, details["units"]),
                                     scope=sam.image_encoder)
    if not restored:
        return stored["units"]
    if progress is not None:
        progress.skip(len(units))
    return [{**r, "cached": True} for r in stored["units"]]


def reconstruct_model_(sam: nn.Module, calib: CocoBoxPrompts, recon: ReconConfig, recipe: UnitRecipe,
                       units: list[ReconUnit] | None = None, *, settings_for: SettingsFor | None = None,
                       track_interference: bool | None = None, interference_images: int | None = None,
                       context: RunContext | None = None) -> ReconReport:
    """Reconstruct `units` (default: `recon_units(sam, recon)`) of a calibrated `sam` in order, then `finish_`.

    The image-encoder units come first and use `ReconSettings.from_config(recon)`; with the stage cache on they are
    restored from it when stored (`reconstruct_encoder_units_`). settings_for: per-unit stage settings of
    the decoder units (None: `ReconSettings.from_config(recon)`); track_interference: record the per-step errors on
    `interference_images` images before and after the decoder units (module docstring; None:
    `recon.track_interference` / `recon.interference_images`); context: the run's stores (None: no stage
    cache, every encoder pass computed). Returns the `ReconReport` (per-unit records, interference).
    """
    context = RunContext() if context is None else context
    units = recon_units(sam, recon) if units is None else units
    track_interference = recon.track_interference if track_interference is None else track_interference
    interference_images = recon.interference_images if interference_images is None else interference_images
    encoder_units = [u for u in units if u.in_encoder]
    if units[:len(encoder_units)] != encoder_units:
        raise ValueError("the image-encoder units must come before the decoder units")
    start = time.perf_counter()
    progress = ReconProgress(len(units), context.progress)
    try:
        records = reconstruct_encoder_units_(sam, calib, recon, recipe, encoder_units, context, progress)
        interference: list[dict[str, Any]] = []
        records += reconstruct_units_(sam, calib, recon, recipe, units[len(encoder_units):], settings_for,
                                      interference if track_interference else None, interference_images,
                                      context.embeddings, progress)
    finally:
        progress.close()
    baked = finish_(sam)
    seconds = time.perf_counter() - start
    logger.info("reconstructed %d units (%d layers baked) in %.1fs", len(records), baked, seconds)
    stage = dataclasses.asdict(ReconSettings.from_config(recon))
    return ReconReport(settings={**dataclasses.asdict(recon), "stage": stage},
                       recipe=recipe, units=records, baked_layers=baked, seconds=round(seconds, 3),
                       interference=interference if track_interference else None)


__all__ = ["INTERFERENCE_START", "ReconReport", "SettingsFor", "UnitRecipe", "activation_quantizers",
           "encoder_stage_fields", "finish_", "has_work", "interference_entry", "prepare_unit_",
           "rebuild_reconstructed_", "recon_units",
           "reconstruct_encoder_units_", "reconstruct_model_", "reconstruct_units_", "roundable_layers", "subsample"]

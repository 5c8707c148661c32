"""Block-reconstruction baselines: `brecq` (AdaRound, activations fixed) and `qdrop` (+ LSQ + QDrop).

Both quantize per `config.quant` and calibrate every range with its observers (`quantize_calibrate_`; the
shipped experiments use MSE activation ranges, OMSE's, as QDrop's and PTQ4SAM's code do), then reconstruct the
units of `config.recon` in data-flow order with the unit loop of `carsam.recon.driver`. They differ only in the
per-unit recipe (`UnitRecipe`): BRECQ learns the rounding only; QDrop also learns the activation steps (LSQ) and
drops activation quantization at random (keep probability `recon.quant_prob`) while a unit is optimised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from carsam.methods.calibrate import quantize_calibrate_
from carsam.methods.registry import Method, register
from carsam.recon.driver import UnitRecipe, reconstruct_model_

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from carsam.config import RunConfig
    from carsam.data.coco import CocoBoxPrompts
    from carsam.run_context import RunContext


def qdrop_recipe(config: RunConfig) -> UnitRecipe:
    """QDrop's per-unit recipe: learned activation steps and keep probability `config.recon.quant_prob`."""
    return UnitRecipe(learn_act_scales=True, quant_prob=config.recon.quant_prob)


def apply_brecq(sam: Sam, calib: CocoBoxPrompts, config: RunConfig, context: RunContext) -> dict[str, Any]:
    """BRECQ: calibrated ranges, then AdaRound unit by unit with the activation quantizers fixed."""
    details = quantize_calibrate_(sam, calib, config, context)
    details["recon"] = reconstruct_model_(sam, calib, config.recon, UnitRecipe(), context=context)
    return details


def apply_qdrop(sam: Sam, calib: CocoBoxPrompts, config: RunConfig, context: RunContext) -> dict[str, Any]:
    """QDrop: calibrated ranges, then AdaRound + LSQ activation steps + QDrop (p = `recon.quant_prob`) per unit."""
    details = quantize_calibrate_(sam, calib, config, context)
    details["recon"] = reconstruct_model_(sam, calib, config.recon, qdrop_recipe(config), context=context)
    return details


register(Method("brecq", apply_brecq, trains=True, summary="BRECQ: AdaRound block reconstruction, activations fixed"))
register(Method("qdrop", apply_qdrop, trains=True,
                summary="QDrop: AdaRound + LSQ activation steps + random drop (p=0.5)"))

__all__ = ["apply_brecq", "apply_qdrop", "qdrop_recipe"]

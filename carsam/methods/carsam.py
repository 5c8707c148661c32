"""CAR-SAM: PTQ4SAM's quantizers and reconstruction + MatMul-Aware Compensation (MAC) + JCAR.

Order of `apply_carsam` (docs/methods.md, "CAR-SAM: our reading"):

1. PTQ4SAM's preparation (`prepare_ptq4sam_`): quantize per `config.quant`, BIG sign folding, AGQ log
   softmax quantizers, calibrate every range;
2. MAC (`carsam.methods.mac.apply_mac_`) when `mac.enabled` and `mac.order == "before"`: closed-form
   corrections of q/k/v_proj so that each attention MatMul with quantized operands matches its FP
   result; reconstruction then starts its rounding from the compensated weights;
3. QDrop reconstruction (PTQ4SAM's recipe): the image-encoder blocks (unless `recon.encoder_grouping`
   is `none`), then the decoder units. With `jcar.enabled` the decoder units are `jcar.grouping`'s
   (`block`, `pair` or `chain`: units spanning the coupled token and image branches) and each two-stream
   unit's loss is `w_tokens * MSE(queries) + w_image * MSE(keys)` (`carsam.methods.jcar`); otherwise
   they are `recon.grouping`'s with QDrop's loss;
4. MAC when `mac.order == "after"`: corrects the reconstructed (baked) weights; the affected
   projections' weight quantizers are re-ranged, so their AdaRound rounding is replaced by
   round-to-nearest of the corrected weights (an ablation, not the default).

`carsam run experiments/carsam_w4a4.yaml jcar.enabled=false` is the MAC-only ablation and
`mac.enabled=false` the JCAR-only one; both off is PTQ4SAM exactly (same code path, same numbers).
`details` holds PTQ4SAM's `big`/`agq`, the `mac` record (per attention and projection: score error
before/after, solve time) and the `recon` record (per unit and stream loss curves, and the per-step
interference entries when `recon.track_interference`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from carsam.methods.jcar import jcar_settings_for
from carsam.methods.mac import apply_mac_
from carsam.methods.ptq4sam import prepare_ptq4sam_
from carsam.methods.qdrop import qdrop_recipe
from carsam.methods.registry import Method, register
from carsam.models.finite import check_finite_
from carsam.recon.driver import recon_units, reconstruct_model_
from carsam.recon.stage import ReconSettings
from carsam.recon.units import ReconUnit

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from carsam.config import RunConfig
    from carsam.data.coco import CocoBoxPrompts
    from carsam.run_context import RunContext


def carsam_units(sam: Sam, config: RunConfig) -> list[ReconUnit]:
    """Encoder blocks (unless `recon.encoder_grouping` is `none`), then the decoder units: `jcar.grouping`'s
    when JCAR is on, `recon.grouping`'s otherwise."""
    return recon_units(sam, config.recon, config.jcar.grouping if config.jcar.enabled else None)


def apply_carsam(sam: Sam, calib: CocoBoxPrompts, config: RunConfig, context: RunContext) -> dict[str, Any]:
    """CAR-SAM (module docstring): PTQ4SAM preparation, MAC, QDrop reconstruction with JCAR units."""
    details = prepare_ptq4sam_(sam, calib, config, context)
    mac_on = config.mac.enabled and config.quant.quantize_decoder
    if mac_on and config.mac.order == "before":
        details["mac"] = apply_mac_(sam, calib, config.mac, source=context.embeddings)
        check_finite_(sam, "MAC")
    settings_for = None
    if config.jcar.enabled:
        settings_for = jcar_settings_for(ReconSettings.from_config(config.recon), config.jcar)
    details["recon"] = reconstruct_model_(sam, calib, config.recon, qdrop_recipe(config), carsam_units(sam, config),
                                          settings_for=settings_for, context=context)
    if mac_on and config.mac.order == "after":
        details["mac"] = apply_mac_(sam, calib, config.mac, source=context.embeddings)
        check_finite_(sam, "MAC")
    return details


register(Method("carsam", apply_carsam, trains=True,
                summary="CAR-SAM: PTQ4SAM + MatMul-Aware Compensation + Joint Cross-Attention Reconstruction"))

__all__ = ["apply_carsam", "carsam_units"]

"""The reference points of every table: full precision, round-to-nearest, and the box-as-mask floor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from carsam.methods.calibrate import quantize_calibrate_
from carsam.methods.registry import Method, register

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from carsam.config import RunConfig
    from carsam.data.coco import CocoBoxPrompts
    from carsam.run_context import RunContext


def apply_fp(sam: Sam, calib: CocoBoxPrompts, config: RunConfig, context: RunContext) -> dict[str, Any]:
    """Leave the model in full precision."""
    return {}


register(Method("fp", apply_fp, quantized=False, summary="full-precision reference"))
register(Method("rtn", quantize_calibrate_, summary="round-to-nearest with calibrated ranges"))
register(Method("box_as_mask", apply_fp, quantized=False, uses_model=False,
                summary="floor: each prompt box filled as its mask"))

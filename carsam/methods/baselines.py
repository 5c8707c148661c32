"""The reference points of every table: full precision, round-to-nearest, and the box-as-mask floor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from carsam.methods.calibrate import calibrate_
from carsam.methods.registry import Method, register
from carsam.models.quantize import quantize_
from carsam.quant.quantizers import iter_quantizers

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from carsam.config import RunConfig
    from carsam.data.coco import CocoBoxPrompts


def apply_fp(sam: Sam, calib: CocoBoxPrompts, config: RunConfig) -> dict[str, Any]:
    """Leave the model in full precision."""
    return {}


def apply_rtn(sam: Sam, calib: CocoBoxPrompts, config: RunConfig) -> dict[str, Any]:
    """Round-to-nearest: quantize per `config.quant`, calibrate the ranges, no reconstruction."""
    quantize_(sam, config.quant)
    calibrate_(sam, calib)
    return {"num_quantizers": sum(1 for _ in iter_quantizers(sam)), "calib_images": len(calib)}


register(Method("fp", apply_fp, quantized=False, summary="full-precision reference"))
register(Method("rtn", apply_rtn, summary="round-to-nearest with calibrated ranges"))
register(Method("box_as_mask", apply_fp, quantized=False, uses_model=False,
                summary="floor: each prompt box filled as its mask"))

"""Calibration: run the quantized SAM over the calibration set so every observer sees real inputs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from segment_anything.modeling import Sam

from carsam.data.coco import CocoBoxPrompts
from carsam.eval.inference import EmbeddingSource, box_predictor, protocol_pass
from carsam.models.quantize import calibrate_weights_, quantize_
from carsam.quant.quantizers import QuantMode, iter_quantizers
from carsam.quant.state import assert_quant_mode, set_quant_mode

if TYPE_CHECKING:
    from carsam.config import RunConfig
    from carsam.run_context import RunContext

logger = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """The calibration set cannot calibrate the model (e.g. it is empty or has no prompts)."""


def calibrate_(sam: Sam, calib: CocoBoxPrompts, *, progress: bool = False,
               source: EmbeddingSource | None = None) -> Sam:
    """Observe weights and activations on `calib` (each image with all its prompts), then switch
    every quantizer to QUANTIZED with its qparams computed from what it observed.

    `source`: where the predictor gets image embeddings (the run's embedding store, or None: encode).
    Raises CalibrationError when the set is empty or gives the decoder no prompt to observe.
    """
    if len(calib) == 0 or calib.num_prompts == 0:
        raise CalibrationError(f"the calibration set is empty ({len(calib)} images, {calib.num_prompts} prompts); "
                               "point data.calib_* at images with annotations")
    calibrate_weights_(sam)
    set_quant_mode(sam, QuantMode.CALIBRATE)
    with torch.no_grad():  # not inference_mode: observer state must stay usable by later autograd steps
        protocol_pass(box_predictor(sam, source=source), calib, progress=progress, desc="calibrate")
    set_quant_mode(sam, QuantMode.QUANTIZED)
    assert_quant_mode(sam, QuantMode.QUANTIZED)
    uncalibrated = [path for path, q in iter_quantizers(sam) if not q.is_calibrated]
    if uncalibrated:
        raise CalibrationError(f"{len(uncalibrated)} quantizers saw no data during calibration, e.g. {uncalibrated[0]}")
    logger.info("calibrated %d quantizers on %d images", sum(1 for _ in iter_quantizers(sam)), len(calib))
    return sam


def calibration_counts(sam: Sam, calib: CocoBoxPrompts) -> dict[str, Any]:
    """What a run record keeps of a calibration: the number of quantizers and of calibration images."""
    return {"num_quantizers": sum(1 for _ in iter_quantizers(sam)), "calib_images": len(calib)}


def quantize_calibrate_(sam: Sam, calib: CocoBoxPrompts, config: RunConfig, context: RunContext) -> dict[str, Any]:
    """Quantize per `config.quant` and calibrate every range on `calib`: the `rtn` method, and the starting
    point of the reconstruction methods. Returns `calibration_counts`."""
    quantize_(sam, config.quant)
    calibrate_(sam, calib, progress=context.progress, source=context.embeddings)
    return calibration_counts(sam, calib)

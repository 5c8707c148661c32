"""Calibration: run the quantized SAM over the calibration set so every observer sees real inputs."""

from __future__ import annotations

import logging

import torch
from segment_anything.modeling import Sam
from tqdm import tqdm

from carsam.data.coco import CocoBoxPrompts
from carsam.eval.inference import SamBoxPredictor
from carsam.models.quantize import calibrate_weights_
from carsam.quant.quantizers import QuantMode, assert_quant_mode, iter_quantizers, set_quant_mode

logger = logging.getLogger(__name__)


class CalibrationError(ValueError):
    """The calibration set cannot calibrate the model (e.g. it is empty or has no prompts)."""


def calibrate_(sam: Sam, calib: CocoBoxPrompts, *, progress: bool = False) -> Sam:
    """Observe weights and activations on `calib` (each image with all its prompts), then switch
    every quantizer to QUANTIZED with its qparams computed from what it observed.

    Raises CalibrationError when the set is empty or gives the decoder no prompt to observe.
    """
    if len(calib) == 0 or calib.num_prompts == 0:
        raise CalibrationError(f"the calibration set is empty ({len(calib)} images, {calib.num_prompts} prompts); "
                               "point data.calib_* at images with annotations")
    calibrate_weights_(sam)
    set_quant_mode(sam, QuantMode.CALIBRATE)
    predictor = SamBoxPredictor(sam)
    with torch.no_grad():  # not inference_mode: observer state must stay usable by later autograd steps
        for image_id in tqdm(calib.image_ids, desc="calibrate", unit="img", disable=not progress):
            boxes = calib.prompts(image_id)[0]
            if len(boxes):
                predictor.predict(predictor.embed_image(calib, image_id), boxes)
    set_quant_mode(sam, QuantMode.QUANTIZED)
    assert_quant_mode(sam, QuantMode.QUANTIZED)
    uncalibrated = [path for path, q in iter_quantizers(sam) if not q.is_calibrated]
    if uncalibrated:
        raise CalibrationError(f"{len(uncalibrated)} quantizers saw no data during calibration, e.g. {uncalibrated[0]}")
    logger.info("calibrated %d quantizers on %d images", sum(1 for _ in iter_quantizers(sam)), len(calib))
    return sam

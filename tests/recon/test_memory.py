"""Memory bounded by a setting, not by the data: with `max_boxes` per decoder call, a block-I/O sample holds at most
that many boxes, and the peak memory of a reconstruction step and of a decoder pass stays flat from 7 to 100 boxes
per image; without the bound it grows with the boxes (the control, so the measurement can fail). Also: fp16
storage halves the block I/O and its samples come back as float32."""

from __future__ import annotations

import json

import pytest
import torch

from carsam.config import ReconConfig
from carsam.data.coco import CocoBoxPrompts
from carsam.eval.inference import SamBoxPredictor
from carsam.recon.block_io import capture_block_io
from carsam.recon.driver import UnitRecipe, prepare_unit_
from carsam.recon.memory import peak_allocated_bytes
from carsam.recon.stage import ReconSettings, reconstruct_unit_plain
from carsam.recon.units import find_units

CHUNK = 8


def _many_boxes(small_coco, tmp_path, boxes: int) -> CocoBoxPrompts:
    """The first calibration image, prompted by `boxes` detector boxes (its GT boxes, shifted a pixel at a time)."""
    coco = json.loads(small_coco["calib_annotations"].read_text())
    image_id = coco["images"][0]["id"]
    gt = [a["bbox"] for a in coco["annotations"] if a["image_id"] == image_id]
    dets = [{"image_id": image_id, "category_id": 1, "score": 0.9,
             "bbox": [gt[i % len(gt)][0] + (i // len(gt)) % 5, *gt[i % len(gt)][1:]]} for i in range(boxes)]
    path = tmp_path / f"prompts_{boxes}.json"
    path.write_text(json.dumps(dets))
    pool = CocoBoxPrompts(small_coco["calib_images"], small_coco["calib_annotations"], path, prompt_source="detector")
    return pool.subset(1, seed=0, require_prompts=True)


def _step_peak(qsam, calib, max_boxes: int) -> tuple[int, int]:
    """(peak bytes of 2 reconstruction steps of layer 0's token->image attention, the largest sample's boxes)."""
    unit = find_units(qsam, "attention_mlp")[1]
    block_io = capture_block_io(qsam, unit, calib, inputs="quantized", max_boxes=max_boxes)
    prepare_unit_(unit.module(qsam), UnitRecipe(learn_act_scales=True, quant_prob=0.5))
    settings = ReconSettings.from_config(ReconConfig(iters=2))
    torch.manual_seed(0)
    return peak_allocated_bytes(lambda: reconstruct_unit_plain(qsam, unit, block_io, settings)), block_io.max_batch


@pytest.mark.parametrize("boxes", [50, 100])
def test_reconstruction_step_memory_is_flat_in_the_box_count(qsam, small_coco, tmp_path, boxes):
    import copy

    few, few_batch = _step_peak(copy.deepcopy(qsam), _many_boxes(small_coco, tmp_path, 7), CHUNK)
    many, many_batch = _step_peak(copy.deepcopy(qsam), _many_boxes(small_coco, tmp_path, boxes), CHUNK)
    assert few_batch == 7 and many_batch == CHUNK
    assert many <= 1.5 * few, f"peak {many / 2**20:.1f} MiB at {boxes} boxes vs {few / 2**20:.1f} MiB at 7"
    unbounded, batch = _step_peak(copy.deepcopy(qsam), _many_boxes(small_coco, tmp_path, boxes), 4 * boxes)
    assert batch == boxes and unbounded > 3 * few  # the control: one sample of all boxes grows with them


def test_decoder_pass_memory_is_flat_in_the_box_count(qsam, small_coco, tmp_path):
    peaks = {}
    for boxes in (7, 100):
        calib = _many_boxes(small_coco, tmp_path, boxes)
        image_id = calib.image_ids[0]
        for chunk in (CHUNK, 128):
            predictor = SamBoxPredictor(qsam, chunk)
            embedding = predictor.embed_image(calib, image_id)
            prompts = calib.prompts(image_id)[0]
            peaks[boxes, chunk] = peak_allocated_bytes(lambda: predictor.predict(embedding, prompts))
    # the (N, H, W) masks returned are numpy, outside the measure; what stays is the decoder's working memory
    assert peaks[100, CHUNK] <= 1.5 * peaks[7, CHUNK]
    assert peaks[100, 128] > 3 * peaks[7, 128]


def test_fp16_storage_halves_the_block_io_and_draws_float32(qsam, calib2):
    unit = find_units(qsam, "attention_mlp")[1]
    full = capture_block_io(qsam, unit, calib2)
    half = capture_block_io(qsam, unit, calib2, dtype=torch.float16)
    assert half.nbytes * 2 == full.nbytes
    drawn = half.sample(0)
    assert all(t.dtype == torch.float32 for t in (*drawn.args, *drawn.targets))
    assert torch.allclose(drawn.targets[0], full.sample(0).targets[0], rtol=1e-2, atol=1e-2)

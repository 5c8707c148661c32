"""SamBoxPredictor: shapes, empty prompts, chunking, and agreement with segment_anything's predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from carsam.eval.inference import ImageEmbedding, SamBoxPredictor
from carsam.testbed.spec import build_testbed_sam

H, W = 96, 150  # non-square: the long side is resized to 128 and the short side padded


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return build_testbed_sam()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def boxes() -> np.ndarray:
    """Five xyxy boxes inside the image, some fractional."""
    return np.array([[10, 5, 60, 50], [0, 0, 150, 96], [70.5, 20.25, 140, 90], [30, 40, 33, 44],
                     [100, 10, 149.5, 60]], dtype=np.float32)


def test_embedding_has_the_documented_sizes(sam, image):
    embedding = SamBoxPredictor(sam).embed(image)
    assert isinstance(embedding, ImageEmbedding)
    assert embedding.features.shape == (1, 256, 16, 16)
    assert embedding.input_size == (82, 128) and embedding.original_size == (H, W)


def test_predict_gives_one_bool_mask_and_one_score_per_box(sam, image, boxes):
    predictor = SamBoxPredictor(sam)
    masks, ious = predictor.predict(predictor.embed(image), boxes)
    assert masks.shape == (5, H, W) and masks.dtype == bool
    assert ious.shape == (5,) and ious.dtype == np.float32 and np.all(np.isfinite(ious))


def test_no_boxes_give_empty_arrays_of_the_right_shape(sam, image):
    predictor = SamBoxPredictor(sam)
    masks, ious = predictor.predict(predictor.embed(image), np.zeros((0, 4), np.float32))
    assert masks.shape == (0, H, W) and masks.dtype == bool
    assert ious.shape == (0,) and ious.dtype == np.float32


def test_chunked_decoding_equals_one_batch(sam, image, boxes):
    one_batch = SamBoxPredictor(sam, max_boxes_per_batch=64)
    embedding = one_batch.embed(image)
    masks, ious = one_batch.predict(embedding, boxes)
    chunked_masks, chunked_ious = SamBoxPredictor(sam, max_boxes_per_batch=2).predict(embedding, boxes)
    np.testing.assert_array_equal(chunked_masks, masks)
    np.testing.assert_allclose(chunked_ious, ious, rtol=1e-5, atol=1e-6)


def test_predictions_match_segment_anythings_predictor(sam, image, boxes):
    ours = SamBoxPredictor(sam)
    masks, ious = ours.predict(ours.embed(image), boxes)
    reference = SamPredictor(sam)
    reference.set_image(image)
    ref_boxes = torch.as_tensor(reference.transform.apply_boxes(boxes, (H, W)), dtype=torch.float32)
    ref_masks, ref_ious, _ = reference.predict_torch(None, None, ref_boxes, multimask_output=False)
    np.testing.assert_array_equal(masks, ref_masks[:, 0].numpy())
    np.testing.assert_allclose(ious, ref_ious[:, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_predictor_rejects_images_that_are_not_hw3_uint8(sam):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        SamBoxPredictor(sam).embed(np.zeros((H, W), np.uint8))


def test_predictor_leaves_autograd_and_model_mode_alone(sam, image, boxes):
    predictor = SamBoxPredictor(sam)
    predictor.predict(predictor.embed(image), boxes[:1])
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert not sam.training

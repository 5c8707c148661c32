"""The testbed: SAM's real decoder shape, an fp16 checkpoint that round-trips, a recipe that learns."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from carsam.models.checkpoint import CheckpointError
from carsam.testbed.spec import TestbedSpec, build_testbed_from_checkpoint, build_testbed_sam
from carsam.testbed.train import (
    TrainSpec,
    forward_boxes,
    load_training_set,
    sample_batch,
    save_checkpoint,
    segmentation_loss,
)


def test_decoder_has_real_sam_shape():
    t = build_testbed_sam().mask_decoder.transformer
    attn = t.layers[0].cross_attn_token_to_image
    assert (t.depth, t.embedding_dim, t.num_heads, t.layers[0].mlp.lin1.out_features) == (2, 256, 8, 2048)
    assert attn.internal_dim == 128  # attention downsample 2, as in SAM
    assert TestbedSpec().embedding_grid >= 16


def test_fp16_checkpoint_round_trips_to_the_upcast_model(tmp_path):
    torch.manual_seed(0)
    sam = build_testbed_sam()
    loaded = build_testbed_from_checkpoint(save_checkpoint(sam, tmp_path / "t.pth"))
    for (name, a), (_, b) in zip(sam.state_dict().items(), loaded.state_dict().items()):
        assert b.dtype == a.dtype and torch.equal(a.half().to(a.dtype), b), name


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    small = build_testbed_sam(dataclasses.replace(TestbedSpec(), encoder_depth=2, encoder_global_attn_indexes=(1,)))
    with pytest.raises(CheckpointError, match="does not match"):
        build_testbed_from_checkpoint(save_checkpoint(small, tmp_path / "s.pth"))


def test_loss_is_lower_for_the_true_mask():
    target = torch.zeros(2, 32, 32)
    target[:, 8:20, 8:20] = 1
    good_logits = (target * 2 - 1) * 8
    bad_logits = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(0))
    iou = torch.ones(2)
    good, bad = (segmentation_loss(logits, target, iou, 20.0)[0] for logits in (good_logits, bad_logits))
    assert good < 0.1 < bad


def test_recipe_overfits_a_fixed_batch(small_coco):
    torch.manual_seed(0)
    sam = build_testbed_sam().train()
    data = load_training_set(small_coco["calib_images"], small_coco["calib_annotations"], 128)
    spec = TrainSpec(images_per_step=2, boxes_per_image=2)
    images, boxes, targets = sample_batch(data, spec, sam, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(sam.parameters(), lr=1e-3)

    def loss() -> torch.Tensor:
        emb = sam.image_encoder(images)
        parts = []
        for i in range(2):
            logits, iou = forward_boxes(sam, emb[i:i + 1], boxes[i])
            parts.append(segmentation_loss(logits, targets[i], iou, 20.0)[0])
        return torch.stack(parts).mean()

    first = loss()
    for _ in range(12):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.7 * first.item()

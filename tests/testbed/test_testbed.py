"""The testbed: SAM's real decoder shape, an fp16 checkpoint that round-trips, a recipe that learns, the recipe's
knobs (decay scope, token learning rate and init) and a resumable training."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from carsam.models.checkpoint import CheckpointError
from carsam.testbed import train as train_module
from carsam.testbed.frames import frame_for
from carsam.testbed.sam2_spec import build_sam2_testbed
from carsam.testbed.spec import TestbedSpec, build_testbed_from_checkpoint, build_testbed_sam
from carsam.testbed.train import (
    TrainSpec,
    init_token_embeddings_,
    is_token_embedding,
    load_training_set,
    parameter_groups,
    sample_batch,
    save_checkpoint,
    segmentation_loss,
    train_testbed,
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


@pytest.mark.parametrize("build", [build_testbed_sam, build_sam2_testbed], ids=["sam", "sam2"])
def test_recipe_overfits_a_fixed_batch(small_coco, build):
    torch.manual_seed(0)
    sam = build().train()
    frame = frame_for(sam)
    data = load_training_set(small_coco["calib_images"], small_coco["calib_annotations"], frame)
    spec = TrainSpec(images_per_step=2, boxes_per_image=2)
    images, boxes, targets = sample_batch(data, spec, frame, torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, frame.size, frame.size) and targets[0].shape[-2:] == (frame.size, frame.size)
    opt = torch.optim.AdamW(sam.parameters(), lr=1e-3)

    def loss() -> torch.Tensor:
        features = frame.encode(images)
        parts = []
        for i in range(2):
            logits, iou = frame.decode(features[i], boxes[i])
            parts.append(segmentation_loss(logits, targets[i], iou, 20.0)[0])
        return torch.stack(parts).mean()

    first = loss()
    for _ in range(12):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.7 * first.item()


def test_matrices_scope_decays_only_linear_and_conv_weights_and_scales_token_lr():
    sam = build_testbed_sam()
    spec = TrainSpec(decay_scope="matrices", embedding_lr_scale=10.0, weight_decay=0.05, lr=1e-3)
    names = {id(p): n for n, p in sam.named_parameters()}
    groups = parameter_groups(sam, spec)
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    fast = {names[id(p)] for g in groups if g["lr"] == pytest.approx(1e-2) for p in g["params"]}
    assert "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight" in decayed
    assert "image_encoder.patch_embed.proj.weight" in decayed  # a Conv2d
    assert not any(n.endswith(".bias") or "norm" in n or "rel_pos" in n or n == "image_encoder.pos_embed"
                   for n in decayed)
    assert fast == {n for n in names.values() if is_token_embedding(n)} == {
        "mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight", "prompt_encoder.not_a_point_embed.weight",
        *(f"prompt_encoder.point_embeddings.{i}.weight" for i in range(4))}
    assert not fast & decayed
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_v1_scope_decays_everything_at_one_rate():
    groups = parameter_groups(build_testbed_sam(), TrainSpec())
    assert {g["weight_decay"] for g in groups} == {0.05} and {g["lr"] for g in groups} == {1e-3}


def test_token_init_std_redraws_only_the_token_embeddings():
    torch.manual_seed(0)
    sam = build_testbed_sam()
    before = {n: p.clone() for n, p in sam.named_parameters()}
    init_token_embeddings_(sam, 8.0)
    for name, param in sam.named_parameters():
        assert torch.equal(param, before[name]) != is_token_embedding(name), name
    assert 6.0 < float(sam.mask_decoder.mask_tokens.weight.detach().std()) < 10.0


def test_resumed_training_is_bit_identical_to_an_uninterrupted_one(small_coco, tmp_path, monkeypatch):
    frame = frame_for(build_testbed_sam())
    data = load_training_set(small_coco["calib_images"], small_coco["calib_annotations"], frame)
    spec = TrainSpec(steps=4, images_per_step=1, boxes_per_image=1, warmup_steps=1, log_every=1, checkpoint_every=2)

    def fresh():
        torch.manual_seed(0)
        return build_testbed_sam()

    straight = fresh()
    history = train_testbed(straight, data, spec)
    calls = []

    def dies_at_step_3(*args, **kwargs):  # one loss call per step here: the third call is step 3
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return segmentation_loss(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "segmentation_loss", dies_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            train_testbed(fresh(), data, spec, tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 2
    with pytest.raises(ValueError, match="another recipe"):
        train_testbed(fresh(), data, dataclasses.replace(spec, lr=2e-3), tmp_path / "state.pt")
    resumed = fresh()
    resumed_history = train_testbed(resumed, data, spec, tmp_path / "state.pt")
    assert [h["loss"] for h in resumed_history] == [h["loss"] for h in history]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_recipe_fields_are_validated():
    with pytest.raises(ValueError, match="decay_scope"):
        TrainSpec(decay_scope="some")
    with pytest.raises(ValueError, match="multiple of log_every"):
        TrainSpec(checkpoint_every=150, log_every=100)


def test_output_scope_redraws_only_the_decoders_tokens():
    torch.manual_seed(0)
    sam = build_testbed_sam()
    before = {n: p.clone() for n, p in sam.named_parameters()}
    init_token_embeddings_(sam, 8.0, "output")
    changed = {n for n, p in sam.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"}

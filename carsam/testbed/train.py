"""Train the testbed SAM on the synthetic dataset (the recipe behind `carsam testbed build`).

Recipe: images resized (longest side) to the model's input size and padded the way `Sam.preprocess`
pads; random horizontal flips; per step `images_per_step` images x up to `boxes_per_image` instances,
each prompted by its GT box jittered by `box_jitter` of its side; loss on the single-mask output
(`multimask_output=False`, mask token 0, the protocol's output) = `focal_weight` x sigmoid focal
loss + dice loss (both on logits upsampled to the input frame) + MSE of the IoU head against the
mask's true IoU; AdamW with linear warm-up and cosine decay. `Sam.forward` is no-grad, so the
image encoder, prompt encoder and mask decoder are called directly. The decoder's other three
mask tokens are not trained (the protocol never reads them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from carsam.files import replace_atomic

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Hyper-parameters of the testbed training recipe."""

    steps: int = 3200
    images_per_step: int = 8
    boxes_per_image: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 150
    focal_weight: float = 20.0
    box_jitter: float = 0.05
    seed: int = 0
    log_every: int = 100


@dataclasses.dataclass
class TrainingSet:
    """Images pre-resized to the model input frame, kept in memory.

    images: list of (3, h, w) uint8 tensors (h, w <= img_size); masks: list of (M, h, w) bool tensors.
    """

    images: list[torch.Tensor]
    masks: list[torch.Tensor]


def load_training_set(images_dir: Path, annotations_file: Path, img_size: int) -> TrainingSet:
    """Read a COCO-format split and resize every image and mask to the model's input frame."""
    coco = json.loads(Path(annotations_file).read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    resize = ResizeLongestSide(img_size)
    images, masks = [], []
    for info in coco["images"]:
        anns = by_image.get(info["id"], [])
        if not anns:
            continue
        pixels = np.asarray(Image.open(Path(images_dir) / info["file_name"]).convert("RGB"))
        resized = resize.apply_image(pixels)
        h, w = resized.shape[:2]
        decoded = np.stack([mask_utils.decode(a["segmentation"]) for a in anns])
        inst = F.interpolate(torch.from_numpy(decoded)[None].float(), size=(h, w), mode="nearest")[0] > 0.5
        images.append(torch.from_numpy(resized).permute(2, 0, 1).contiguous())
        masks.append(inst)
    return TrainingSet(images, masks)


def _boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (M, 4) of boolean masks (M, h, w); empty masks give a zero box."""
    boxes = torch.zeros(masks.shape[0], 4)
    for i, m in enumerate(masks):
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(xs):
            boxes[i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    return boxes


def _jitter(boxes: torch.Tensor, rel: float, gen: torch.Generator, limit: int) -> torch.Tensor:
    """Move each edge of xyxy boxes (M, 4) by N(0, rel x side) pixels, clamped into [0, limit]."""
    side = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, dim=1)
    noisy = boxes + torch.randn(boxes.shape, generator=gen) * rel * side
    return noisy.clamp(0, limit)


def sample_batch(data: TrainingSet, spec: TrainSpec, sam: Sam, gen: torch.Generator):
    """One training batch.

    Returns images (B, 3, S, S) normalised and padded, per-image prompt boxes [(k_i, 4)] and
    target masks [(k_i, S, S) float] in the padded input frame, S = img_size.
    """
    size = sam.image_encoder.img_size
    idx = torch.randint(len(data.images), (spec.images_per_step,), generator=gen)
    images, boxes, targets = [], [], []
    for i in idx.tolist():
        img, masks = data.images[i].float(), data.masks[i]
        if torch.rand((), generator=gen) < 0.5:
            img, masks = img.flip(-1), masks.flip(-1)
        pick = torch.randperm(masks.shape[0], generator=gen)[: spec.boxes_per_image]
        masks = masks[pick]
        images.append(sam.preprocess(img[None])[0])
        boxes.append(_jitter(_boxes_from_masks(masks), spec.box_jitter, gen, size))
        pad = (0, size - masks.shape[-1], 0, size - masks.shape[-2])
        targets.append(F.pad(masks.float(), pad))
    return torch.stack(images), boxes, targets


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor,
                      focal_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Focal + dice + IoU-head MSE for logits and targets (k, S, S), iou_pred (k,)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    focal = (alpha_t * ce * (1 - p_t) ** 2).flatten(1).mean(1)
    inter = (prob * target).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    with torch.no_grad():
        hard = (logits > 0).float()
        union = ((hard + target) > 0).float().flatten(1).sum(1).clamp(min=1)
        true_iou = (hard * target).flatten(1).sum(1) / union
    iou_loss = F.mse_loss(iou_pred, true_iou, reduction="none")
    total = (focal_weight * focal + dice + iou_loss).mean()
    return total, {"focal": focal.mean().item(), "dice": dice.mean().item(), "iou": true_iou.mean().item()}


def forward_boxes(sam: Sam, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-mask logits (k, S, S) in the padded input frame and IoU predictions (k,)."""
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    low_res, iou = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=False)
    size = sam.image_encoder.img_size
    logits = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
    return logits[:, 0], iou[:, 0]


def _lr_factor(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train_testbed(sam: Sam, data: TrainingSet, spec: TrainSpec) -> list[dict[str, float]]:
    """Train `sam` in place with the recipe above; returns the logged history."""
    gen = torch.Generator().manual_seed(spec.seed)
    params = [p for p in sam.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec))
    sam.train()
    history, running, start = [], [], time.perf_counter()
    for step in range(spec.steps):
        images, boxes, targets = sample_batch(data, spec, sam, gen)
        embeddings = sam.image_encoder(images)
        losses, stats = [], []
        for i in range(len(boxes)):
            logits, iou = forward_boxes(sam, embeddings[i : i + 1], boxes[i])
            loss, stat = segmentation_loss(logits, targets[i], iou, spec.focal_weight)
            losses.append(loss)
            stats.append(stat)
        loss = torch.stack(losses).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running.append({"loss": loss.item(), **{k: float(np.mean([s[k] for s in stats])) for k in stats[0]}})
        if (step + 1) % spec.log_every == 0 or step + 1 == spec.steps:
            entry = {k: float(np.mean([r[k] for r in running])) for k in running[0]}
            entry.update(step=step + 1, lr=cast(float, sched.get_last_lr()[0]), seconds=time.perf_counter() - start)
            history.append(entry)
            logger.info("step %(step)d loss %(loss).4f train-IoU %(iou).3f lr %(lr).2e %(seconds).0fs", entry)
            running = []
    sam.eval()
    return history


def save_checkpoint(sam: Sam, path: str | Path) -> Path:
    """Write `sam`'s weights as an fp16 state dict (atomically); the FP reference is its fp32 upcast."""
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sam.state_dict().items()}
    return replace_atomic(path, lambda tmp: torch.save(state, tmp))

"""Train the testbed SAM on the synthetic dataset (the recipe behind `carsam testbed build`).

Recipe: images resized (longest side) to the model's input size and padded the way `Sam.preprocess`
pads; random horizontal flips; per step `images_per_step` images x up to `boxes_per_image` instances,
each prompted by its GT box jittered by `box_jitter` of its side; loss on the single-mask output
(`multimask_output=False`, mask token 0, the protocol's output) = `focal_weight` x sigmoid focal
loss + dice loss (both on logits upsampled to the input frame) + MSE of the IoU head against the
mask's true IoU; AdamW with linear warm-up and cosine decay. `Sam.forward` is no-grad, so the
image encoder, prompt encoder and mask decoder are called directly. The decoder's other three
mask tokens are not trained (the protocol never reads them).

Recipe knobs beyond v1's (their defaults reproduce v1 exactly): `decay_scope` (`all`: weight decay on every
parameter, v1; `matrices`: only on Linear/Conv weights, none on embeddings, norms, biases and position
tables, the usual transformer practice), `embedding_lr_scale` (learning-rate multiplier of the learned
tokens and prompt embeddings: `TOKEN_EMBEDDINGS`), `token_init_std` (their initial std; `nn.Embedding`'s
is 1) and `token_init_scope` (`all` of them, or only the decoder's `output` tokens, leaving the prompts'
embeddings at std 1 so that a box's positional encoding is not swamped). With `state_path` the training
state (model, optimiser, schedule, sampler RNG, history, step) is saved every `checkpoint_every` steps and
a later call resumes from it, bit-identically to an uninterrupted run.
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
from torch import nn

from carsam.files import replace_atomic
from carsam.testbed.frames import SamFrame, frame_for

logger = logging.getLogger(__name__)


DECAY_SCOPES = ("all", "matrices")
# the learned embeddings that enter the decoder's token stream (module paths of `nn.Embedding`s): the output
# tokens and the prompt point embeddings (a box adds point_embeddings[2] and [3] to its corners' PE). Not
# `no_mask_embed`, which is added to every image token (the image stream).
TOKEN_EMBEDDINGS = ("mask_decoder.iou_token", "mask_decoder.mask_tokens", "prompt_encoder.point_embeddings",
                    "prompt_encoder.not_a_point_embed")
OUTPUT_TOKENS = TOKEN_EMBEDDINGS[:2]  # the decoder's own tokens; the others carry the prompts
TOKEN_INIT_SCOPES = {"all": TOKEN_EMBEDDINGS, "output": OUTPUT_TOKENS}


class TrainingStateError(ValueError):
    """A saved training state that cannot be resumed with this recipe."""


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
    decay_scope: str = "all"
    embedding_lr_scale: float = 1.0
    token_init_std: float = 1.0
    token_init_scope: str = "all"
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        if self.decay_scope not in DECAY_SCOPES:
            raise ValueError(f"decay_scope must be one of {DECAY_SCOPES}, got '{self.decay_scope}'")
        if self.token_init_scope not in TOKEN_INIT_SCOPES:
            raise ValueError(f"token_init_scope must be one of {tuple(TOKEN_INIT_SCOPES)}, "
                             f"got '{self.token_init_scope}'")
        for name in ("steps", "images_per_step", "boxes_per_image", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every % self.log_every:
            raise ValueError(f"checkpoint_every ({self.checkpoint_every}) must be a multiple of log_every "
                             f"({self.log_every}), so that a resumed history has no gap")
        if not (math.isfinite(self.embedding_lr_scale) and math.isfinite(self.token_init_std)
                and self.embedding_lr_scale > 0 and self.token_init_std > 0):
            raise ValueError("embedding_lr_scale and token_init_std must be > 0, got "
                             f"{self.embedding_lr_scale} and {self.token_init_std}")


@dataclasses.dataclass
class TrainingSet:
    """Images pre-resized to the model input frame, kept in memory.

    images: list of (3, h, w) uint8 tensors (h, w <= img_size); masks: list of (M, h, w) bool tensors.
    """

    images: list[torch.Tensor]
    masks: list[torch.Tensor]


def load_training_set(images_dir: Path, annotations_file: Path, frame: SamFrame) -> TrainingSet:
    """Read a COCO-format split and resize every image and mask to the model's input frame (`frame`'s)."""
    coco = json.loads(Path(annotations_file).read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    images, masks = [], []
    for info in coco["images"]:
        anns = by_image.get(info["id"], [])
        if not anns:
            continue
        pixels = np.asarray(Image.open(Path(images_dir) / info["file_name"]).convert("RGB"))
        resized = frame.resize(pixels)
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


def sample_batch(data: TrainingSet, spec: TrainSpec, frame: SamFrame, gen: torch.Generator):
    """One training batch.

    Returns images (B, 3, S, S) normalised (and padded, SAM v1), per-image prompt boxes [(k_i, 4)] and
    target masks [(k_i, S, S) float] in the input frame, S = the model's input size.
    """
    size = frame.size
    idx = torch.randint(len(data.images), (spec.images_per_step,), generator=gen)
    images, boxes, targets = [], [], []
    for i in idx.tolist():
        img, masks = data.images[i].float(), data.masks[i]
        if torch.rand((), generator=gen) < 0.5:
            img, masks = img.flip(-1), masks.flip(-1)
        pick = torch.randperm(masks.shape[0], generator=gen)[: spec.boxes_per_image]
        masks = masks[pick]
        images.append(frame.to_input(img))
        boxes.append(_jitter(_boxes_from_masks(masks), spec.box_jitter, gen, size))
        targets.append(frame.to_target(masks.float()))
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


def _lr_factor(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def is_token_embedding(name: str, scope: tuple[str, ...] = TOKEN_EMBEDDINGS) -> bool:
    """Whether parameter `name` belongs to one of the embeddings of `scope` (default `TOKEN_EMBEDDINGS`)."""
    return any(name == e or name.startswith(e + ".") for e in scope)


def _decays(name: str, module: nn.Module) -> bool:
    """`matrices` scope: weight decay only on the weight of a Linear or a Conv (not an Embedding, norm, bias,
    positional or relative-position table)."""
    return name.endswith(".weight") and isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))


def parameter_groups(sam: Sam, spec: TrainSpec) -> list[dict]:
    """AdamW groups: (decayed or not) x (token embeddings at `embedding_lr_scale` or not); empty ones dropped."""
    modules = dict(sam.named_modules())
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in sam.named_parameters():
        if not param.requires_grad:
            continue
        owner = modules[name.rsplit(".", 1)[0]] if "." in name else sam
        decayed = spec.decay_scope == "all" or _decays(name, owner)
        groups.setdefault((decayed, is_token_embedding(name)), []).append(param)
    return [{"params": params, "weight_decay": spec.weight_decay if decayed else 0.0,
             "lr": spec.lr * (spec.embedding_lr_scale if token else 1.0)}
            for (decayed, token), params in sorted(groups.items())]


def init_token_embeddings_(sam: Sam, std: float, scope: str = "all") -> None:
    """Re-draw the weights of `TOKEN_INIT_SCOPES[scope]` (`all`: every `TOKEN_EMBEDDINGS`; `output`: the
    decoder's IoU and mask tokens only) from N(0, std²) (global RNG); std 1 leaves them untouched."""
    if std == 1.0:
        return
    with torch.no_grad():
        for name, param in sam.named_parameters():
            if is_token_embedding(name, TOKEN_INIT_SCOPES[scope]):
                param.normal_(0.0, std)


def _recipe_key(spec: TrainSpec) -> str:
    """The recipe a saved training state belongs to (it resumes only under the same one)."""
    return json.dumps(dataclasses.asdict(spec), sort_keys=True)


def _save_state(path: Path, spec: TrainSpec, sam: Sam, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, history: list[dict[str, float]],
                step: int, seconds: float) -> None:
    state = {"model": sam.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "generator": gen.get_state(), "history": history, "step": step, "seconds": seconds,
             "spec": _recipe_key(spec)}
    replace_atomic(path, lambda tmp: torch.save(state, tmp))


def train_testbed(sam: Sam, data: TrainingSet, spec: TrainSpec,
                  state_path: str | Path | None = None) -> list[dict[str, float]]:
    """Train `sam` in place with the recipe above; returns the logged history (`seconds` counts the training
    time of every session). With `state_path`: resume from it if it exists, save to it every
    `spec.checkpoint_every` steps."""
    gen = torch.Generator().manual_seed(spec.seed)
    frame = frame_for(sam)
    groups = parameter_groups(sam, spec)
    params = [p for p in sam.parameters() if p.requires_grad]  # model order: the clipped norm's summation order
    opt = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec))
    history: list[dict[str, float]] = []
    first, before = 0, 0.0
    state_file = Path(state_path) if state_path is not None else None
    if state_file is not None and state_file.is_file():
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if state.get("spec") != _recipe_key(spec):
            raise TrainingStateError(f"{state_file} holds a training of another recipe; delete it or train into "
                                     f"another folder (saved: {state.get('spec')})")
        sam.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        history, first, before = list(state["history"]), int(state["step"]), float(state["seconds"])
        logger.info("resuming the testbed training at step %d from %s", first, state_file)
    sam.train()
    running: list[dict[str, float]] = []
    start = time.perf_counter()
    for step in range(first, spec.steps):
        images, boxes, targets = sample_batch(data, spec, frame, gen)
        features = frame.encode(images)
        losses, stats = [], []
        for i in range(len(boxes)):
            logits, iou = frame.decode(features[i], boxes[i])
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
            entry.update(step=step + 1, lr=cast(float, sched.get_last_lr()[0]),
                         seconds=before + time.perf_counter() - start)
            history.append(entry)
            logger.info("step %(step)d loss %(loss).4f train-IoU %(iou).3f lr %(lr).2e %(seconds).0fs", entry)
            running = []
        if state_file is not None and ((step + 1) % spec.checkpoint_every == 0 or step + 1 == spec.steps):
            _save_state(state_file, spec, sam, opt, sched, gen, history, step + 1, before + time.perf_counter() - start)
    sam.eval()
    return history


def save_checkpoint(sam: Sam, path: str | Path) -> Path:
    """Write `sam`'s weights as an fp16 state dict (atomically); the FP reference is its fp32 upcast."""
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sam.state_dict().items()}
    return replace_atomic(path, lambda tmp: torch.save(state, tmp))

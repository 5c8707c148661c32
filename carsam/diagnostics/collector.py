"""Collect attention-dissipation statistics of a quantized SAM against its own FP twin.

For each image (those without prompt boxes are skipped) the model runs twice as the protocol runs it
(`SamBoxPredictor`: encode, then decode all of the image's prompt boxes in chunks): first with every
quantizer in FP mode, then with the quantizers as the caller left them. A forward pre-hook on the
`pv_matmul` of every attention twin in the chosen scopes receives the softmax probabilities P (its
first input, before the probability quantizer, so P is a distribution in both passes). The FP pass
keeps P on the CPU; the quantized pass compares each call with the FP call of the same attention and
order, accumulates the statistics and drops both. Memory holds one image's FP probabilities (small
in the decoder; for the encoder scope on real SAM, its global-attention blocks dominate, e.g.
12 heads x 4096 x 4096 float32, about 0.8 GB, per global block of SAM-B).

Attentions (the `module` label; `layer` its index in call order):
- `decoder.self_attn`, `decoder.token_to_image`, `decoder.image_to_token` of decoder layer i; the
  final token->image attention is `decoder.token_to_image` with layer = depth (it follows the last layer);
- `encoder.attn` of image-encoder block i (windowed blocks: each window's rows count as rows).

Kinds, per attention and head, each the mean over every query row of every call (all prompts of all
images; each prompt has Nq = 7 token rows in the decoder's token attentions): `entropy_fp`,
`entropy_q`, `entropy_gap` (q - fp), `kl` (KL(P_fp || P_q), nats), and for token->image attentions
only `mask_mass_fp`, `mask_mass_q`, `mask_mass_gap` (q - fp): the share of each token row's mass on
the image tokens inside the prompt's GT mask (`carsam.diagnostics.attention.mask_to_tokens`: soft
weights, the fraction of each token's patch inside the mask).

Which GT mask belongs to a prompt: GT-box prompts (`prompt_source="gt_boxes"`) are the image's non-crowd
annotations in the order `CocoBoxPrompts.ground_truth` returns them, so prompt i is annotation i
(checked: the boxes must be identical). Otherwise (detector boxes) a prompt takes the annotation of the
same category with the highest box IoU, if that IoU is at least `iou_threshold`; prompts matching no
annotation (false positives) have no GT mask and are left out of the mask-mass kinds only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from carsam.data.coco import CocoBoxPrompts
from carsam.diagnostics.attention import kl_divergence, mask_mass, mask_to_tokens, normalized_entropy
from carsam.eval.inference import EmbeddingSource, SamBoxPredictor, box_predictor
from carsam.models.adapters import ATTENTION_TWINS
from carsam.models.architecture import find_encoder_blocks
from carsam.models.quantize import DECODER_SCOPE, ENCODER_SCOPE
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import eval_no_grad, quant_modes_set

if TYPE_CHECKING:
    from segment_anything.modeling import TwoWayTransformer

    from carsam.models.adapters import AttentionTwin

logger = logging.getLogger(__name__)

SCOPES = ("decoder", "encoder")
SELF_ATTN, TOKEN_TO_IMAGE = "decoder.self_attn", "decoder.token_to_image"
IMAGE_TO_TOKEN, ENCODER_ATTN = "decoder.image_to_token", "encoder.attn"
BLOCK_ATTENTIONS = ((SELF_ATTN, "self_attn"), (TOKEN_TO_IMAGE, "cross_attn_token_to_image"),
                    (IMAGE_TO_TOKEN, "cross_attn_image_to_token"))  # (label, attribute of TwoWayAttentionBlock)
ENTROPY_KINDS = ("entropy_fp", "entropy_q", "entropy_gap", "kl")
MASK_KINDS = ("mask_mass_fp", "mask_mass_q", "mask_mass_gap")
FRAME_COLUMNS = ["module", "layer", "head", "kind", "step", "value"]
ProbsSink = Callable[[int, Tensor], None]


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One attention twin: its `module` label, `layer` index, module `path` (for messages), the module."""

    module: str
    layer: int
    path: str
    attention: nn.Module

    @property
    def token_to_image(self) -> bool:
        """Whether its rows are prompt tokens attending to the image tokens."""
        return self.module == TOKEN_TO_IMAGE

    def heads_view(self, P: Tensor) -> Tensor:
        """The P given to `pv_matmul` as `(B, heads, Nq, Nk)` (the encoder's `(B*heads, N, N)` is split)."""
        # `attention_sites` hands out twins only
        return P if P.dim() == 4 else P.reshape(-1, cast("AttentionTwin", self.attention).num_heads, *P.shape[-2:])


def _decoder_sites(sam: nn.Module) -> list[AttentionSite]:
    """The attentions of each `TwoWayAttentionBlock` in call order, then the final token->image attention."""
    transformer: TwoWayTransformer = sam.get_submodule(DECODER_SCOPE)
    sites = [AttentionSite(module, i, f"{DECODER_SCOPE}.layers.{i}.{name}", getattr(block, name))
             for i, block in enumerate(transformer.layers) for module, name in BLOCK_ATTENTIONS]
    final = AttentionSite(TOKEN_TO_IMAGE, len(transformer.layers), f"{DECODER_SCOPE}.final_attn_token_to_image",
                          transformer.final_attn_token_to_image)
    return [*sites, final]


def _encoder_sites(sam: nn.Module) -> list[AttentionSite]:
    """The attention of each image-encoder block (ViT blocks for SAM v1, Hiera blocks for SAM2), in order."""
    blocks = find_encoder_blocks(sam.get_submodule(ENCODER_SCOPE))
    return [AttentionSite(ENCODER_ATTN, i, f"{ENCODER_SCOPE}.{path}.attn", cast("AttentionTwin", block.attn))
            for i, (path, block) in enumerate(blocks)]


def attention_sites(sam: nn.Module, scopes: Sequence[str] = ("decoder",)) -> list[AttentionSite]:
    """The attentions of `scopes` (`decoder`, `encoder`) in call order; raises TypeError unless all are twins."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {SCOPES}, got {tuple(scopes)}")
    sites = (_encoder_sites(sam) if "encoder" in scopes else []) + (_decoder_sites(sam) if "decoder" in scopes else [])
    plain = [s.path for s in sites if not isinstance(s.attention, ATTENTION_TWINS)]
    if plain:
        raise TypeError(f"attention diagnostics need the quantized attention twins, but {len(plain)} attention(s) "
                        f"are plain modules (e.g. {plain[0]}); run carsam.models.quantize.quantize_ on the model first "
                        "(for an FP model, quantize it and leave every quantizer in FP mode), with the scope quantized")
    return sites


def match_prompts(boxes: np.ndarray, category_ids: np.ndarray, gt_boxes: np.ndarray, gt_category_ids: np.ndarray,
                  iou_threshold: float = 0.5) -> np.ndarray:
    """For N prompt boxes `(N, 4)` xyxy, the index of their GT annotation among M `(M, 4)`, -1 for none.

    A prompt's annotation is the one of its category with the highest box IoU, if >= `iou_threshold`.
    Returns `(N,)` int64.
    """
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return np.full(len(boxes), -1, dtype=np.int64)
    iou = box_iou(torch.as_tensor(boxes, dtype=torch.float64), torch.as_tensor(gt_boxes, dtype=torch.float64)).numpy()
    iou[np.asarray(category_ids)[:, None] != np.asarray(gt_category_ids)[None, :]] = 0.0
    best = iou.argmax(axis=1)
    return np.where(iou[np.arange(len(boxes)), best] >= iou_threshold, best, -1).astype(np.int64)


def prompt_mask_tokens(dataset: CocoBoxPrompts, image_id: int, input_size: tuple[int, int], img_size: int,
                       grid: int, iou_threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """Token weights `(N, grid*grid)` of the GT mask of each of the image's N prompts, and `(N,)` bool: has one.

    Prompts without a GT mask get zero weights and False (see the module docstring for the matching).
    """
    boxes, _, category_ids = dataset.prompts(image_id)
    gt_boxes, gt_masks, gt_category_ids = dataset.ground_truth(image_id)
    if np.array_equal(boxes, gt_boxes):  # GT-box prompts: prompt i is annotation i
        index = np.arange(len(boxes))
    else:
        index = match_prompts(boxes, category_ids, gt_boxes, gt_category_ids, iou_threshold)
    valid = index >= 0
    weights = torch.zeros(len(boxes), grid * grid)
    if valid.any():
        weights[torch.from_numpy(valid)] = mask_to_tokens(torch.from_numpy(gt_masks[index[valid]]), input_size,
                                                          img_size, grid)
    return weights, torch.from_numpy(valid)


def call_stats(P_fp: Tensor, P_q: Tensor) -> dict[str, Tensor]:
    """Entropy kinds of one call: P_fp, P_q `(B, h, Nq, Nk)` -> `{kind: (B, h, Nq)}`."""
    ent_fp, ent_q = normalized_entropy(P_fp), normalized_entropy(P_q)
    return {"entropy_fp": ent_fp, "entropy_q": ent_q, "entropy_gap": ent_q - ent_fp, "kl": kl_divergence(P_fp, P_q)}


def mask_call_stats(P_fp: Tensor, P_q: Tensor, mask_tokens: Tensor) -> dict[str, Tensor]:
    """Mask-mass kinds of B rows that have a GT mask: P_fp, P_q `(B, h, Nq, Nk)`, mask_tokens `(B, Nk)`
    -> `{kind: (B, h, Nq)}`."""
    weights = mask_tokens.to(P_q.device)[:, None]  # (B, 1, Nk), broadcast over heads
    fp, q = mask_mass(P_fp, weights), mask_mass(P_q, weights)
    return {"mask_mass_fp": fp, "mask_mass_q": q, "mask_mass_gap": q - fp}


class _Accumulator:
    """Running per-head sums and row counts of each (attention index, kind)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[int, str], Tensor] = {}
        self.rows: dict[tuple[int, str], int] = {}

    def add(self, index: int, stats: dict[str, Tensor]) -> None:
        """Add `{kind: (B, h, Nq)}` rows of attention `index`."""
        for kind, values in stats.items():
            key = (index, kind)
            self.sums[key] = self.sums.get(key, 0.0) + values.double().sum(dim=(0, 2)).cpu()
            self.rows[key] = self.rows.get(key, 0) + values.shape[0] * values.shape[2]

    def frame(self, sites: Sequence[AttentionSite]) -> pd.DataFrame:
        """Long format: one row per (attention, head, kind) with the mean, step 0."""
        rows = [{"module": sites[i].module, "layer": sites[i].layer, "head": head, "kind": kind, "step": 0,
                 "value": float(total / self.rows[(i, kind)])}
                for (i, kind), sums in self.sums.items() for head, total in enumerate(sums.tolist())]
        return pd.DataFrame(rows, columns=FRAME_COLUMNS)


@contextlib.contextmanager
def tap_probabilities(sites: Sequence[AttentionSite], sink: ProbsSink) -> Iterator[None]:
    """Forward pre-hooks on every site's `pv_matmul` handing `(site index, P (B, h, Nq, Nk))` to `sink`."""
    def hook_for(index: int) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            sink(index, sites[index].heads_view(args[0].detach()))
        return hook

    handles = [cast("AttentionTwin", site.attention).pv_matmul.register_forward_pre_hook(hook_for(i))
               for i, site in enumerate(sites)]  # `attention_sites` hands out twins only
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _PairedImage:
    """One image's FP probabilities, matched call by call with the quantized pass."""

    def __init__(self, sites: Sequence[AttentionSite], accumulator: _Accumulator) -> None:
        self.sites, self.accumulator = sites, accumulator
        self.fp: list[list[Tensor | None]] = [[] for _ in sites]
        self.seen = [0] * len(sites)  # calls of the quantized pass so far
        self.prompt_offset = [0] * len(sites)  # first prompt of the next decoder call
        self.mask_tokens: Tensor | None = None  # (N, Nk) token weights of the image's prompts
        self.has_mask: Tensor | None = None  # (N,) bool

    def keep(self, index: int, P: Tensor) -> None:
        """FP pass: store this call's P on the CPU."""
        self.fp[index].append(P.cpu())

    def compare(self, index: int, P_q: Tensor) -> None:
        """Quantized pass: statistics of this call against the stored FP call, which is then dropped."""
        call = self.seen[index]
        if call >= len(self.fp[index]):
            raise RuntimeError(f"{self.sites[index].path}: more calls in the quantized pass than in the FP pass")
        # entries before `seen` are the consumed (None) ones; this one still holds its FP tensor
        P_fp, self.fp[index][call] = cast(Tensor, self.fp[index][call]).to(P_q.device), None
        self.seen[index] += 1
        self.accumulator.add(index, call_stats(P_fp, P_q))
        if self.sites[index].token_to_image and self.mask_tokens is not None:
            self._add_mask_stats(index, P_fp, P_q)

    def _add_mask_stats(self, index: int, P_fp: Tensor, P_q: Tensor) -> None:
        # `compare` calls this only once `mask_tokens` is set, and `has_mask` is set with it
        assert self.mask_tokens is not None and self.has_mask is not None
        start = self.prompt_offset[index]
        stop = start + P_q.shape[0]
        self.prompt_offset[index] = stop
        keep = self.has_mask[start:stop]
        if keep.any():
            on_device = keep.to(P_q.device)
            stats = mask_call_stats(P_fp[on_device], P_q[on_device], self.mask_tokens[start:stop][keep])
            self.accumulator.add(index, stats)

    def check_complete(self) -> None:
        """Every FP call was matched by a quantized call."""
        unmatched = [s.path for s, calls, seen in zip(self.sites, self.fp, self.seen) if len(calls) != seen]
        if unmatched:
            raise RuntimeError(f"the FP and quantized passes made different calls to {unmatched}")


def _image_stats(predictor: SamBoxPredictor, dataset: CocoBoxPrompts, image_id: int,
                 sites: Sequence[AttentionSite], accumulator: _Accumulator, iou_threshold: float) -> None:
    """Both passes over one image (module docstring), adding its statistics to `accumulator`."""
    sam, boxes = predictor.sam, dataset.prompts(image_id)[0]
    paired = _PairedImage(sites, accumulator)
    with quant_modes_set(sam, QuantMode.FP), tap_probabilities(sites, paired.keep):
        embedding = predictor.embed_image(dataset, image_id)
        predictor.predict(embedding, boxes)
    if any(site.token_to_image for site in sites):
        grid = sam.prompt_encoder.image_embedding_size[0]
        paired.mask_tokens, paired.has_mask = prompt_mask_tokens(
            dataset, image_id, embedding.input_size, sam.image_encoder.img_size, grid, iou_threshold)
    with quant_modes_set(sam, None), tap_probabilities(sites, paired.compare):
        predictor.predict(predictor.embed_image(dataset, image_id), boxes)
    paired.check_complete()


def collect_attention_stats(sam: nn.Module, dataset: CocoBoxPrompts, image_ids: Sequence[int],
                            scopes: Sequence[str] = ("decoder",), *, iou_threshold: float = 0.5,
                            max_boxes_per_batch: int = 64, source: EmbeddingSource | None = None) -> pd.DataFrame:
    """Attention statistics of `sam` (quantizers as they are) against its FP self on `image_ids`.

    Returns the long format `module, layer, head, kind, step, value` (step 0), one row per attention,
    head and kind (module docstring). `sam` must hold the attention twins of `scopes`
    (`carsam.models.quantize.quantize_`); it runs in eval mode under no_grad, and its train/eval flag,
    quantizer modes and hooks are as before afterwards. Call it on a calibrated model: quantizers left
    in CALIBRATE mode would observe these images. `max_boxes_per_batch` chunks the decoder's boxes as
    `SamBoxPredictor` does; `source`: where it gets image embeddings (the run's embedding store; None:
    encode). Raises ValueError if no image has a prompt.
    """
    sites = attention_sites(sam, scopes)
    unknown = sorted(set(image_ids) - set(dataset.image_ids))
    if unknown:
        raise ValueError(f"image ids {unknown[:5]} are not in the dataset")
    chosen = [i for i in dict.fromkeys(image_ids) if len(dataset.prompts(i)[0]) > 0]
    if not chosen:
        raise ValueError("none of the chosen images has a prompt box; pick images with prompts")
    predictor, accumulator = box_predictor(sam, max_boxes_per_batch, source), _Accumulator()
    with eval_no_grad(sam):
        for image_id in chosen:
            _image_stats(predictor, dataset, image_id, sites, accumulator, iou_threshold)
    logger.info("attention diagnostics: %d attentions over %d images (%d skipped without prompts)",
                len(sites), len(chosen), len(set(image_ids)) - len(chosen))
    return accumulator.frame(sites)


__all__ = ["ENCODER_ATTN", "ENTROPY_KINDS", "IMAGE_TO_TOKEN", "MASK_KINDS", "SCOPES", "SELF_ATTN", "TOKEN_TO_IMAGE",
           "AttentionSite", "ProbsSink", "attention_sites", "call_stats", "collect_attention_stats", "mask_call_stats",
           "match_prompts", "prompt_mask_tokens", "tap_probabilities"]

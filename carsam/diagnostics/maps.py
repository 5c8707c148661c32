"""Token->image attention maps of a few val prompts, FP against quantized: what a reviewer looks at.

For each chosen prompt and each token->image attention of the mask decoder (layer i of the two-way
transformer, then the final attention, layer = depth), the map is the softmax row of the decoder's
first mask token (`MASK_TOKEN_ROW`: SAM's token order is [IoU token, mask tokens, prompt tokens], and
mask token 0 makes the single-mask output the protocol scores), averaged over heads, over the image
embedding's g x g grid. It is read, like the statistics of `carsam.diagnostics.collector`, from the
first input of each attention's `pv_matmul` (P before the probability quantizer), once with every
quantizer in FP mode and once with the quantizers as the caller left them.

`runs/<run_id>/attention_maps.npz` (`write_attention_maps` / `read_attention_maps`, plain arrays, no
pickle) keeps the maps with the model-input frame of each prompt's image (SAM: the long side resized to
the encoder's img_size and zero-padded to a square; SAM2: the square resize; then shrunk to at most
`IMAGE_SIDE` pixels) and the box in that frame's pixels, so the report's figures and the dashboard draw
them without the dataset.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from carsam.data.coco import CocoBoxPrompts
from carsam.diagnostics.collector import attention_sites, tap_probabilities
from carsam.eval.inference import EmbeddingSource, SamBoxPredictor, box_predictor
from carsam.files import replace_atomic
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import eval_no_grad, quant_modes_set

logger = logging.getLogger(__name__)

MAPS_FILE = "attention_maps.npz"
MASK_TOKEN_ROW = 1  # row of mask token 0 among the decoder's query tokens (after the IoU token)
IMAGE_SIDE = 256  # the stored frames' largest side, in pixels
FIELDS = ("fp", "q", "layers", "image_ids", "prompt_index", "boxes", "images")


@dataclasses.dataclass(frozen=True)
class AttentionMaps:
    """Token->image maps of S prompts at L attentions (module docstring).

    fp, q: `(S, L, g, g)` float32, each map a probability distribution over the g x g image tokens
    (sums to 1); layers: `(L,)` int64, the attentions' layer labels (depth = the final attention);
    image_ids, prompt_index: `(S,)` int64, the prompt's image and its index among the image's prompts;
    boxes: `(S, 4)` float32 xyxy in `images`' pixels; images: `(S, F, F, 3)` uint8, each prompt's
    model-input frame.
    """

    fp: np.ndarray
    q: np.ndarray
    layers: np.ndarray
    image_ids: np.ndarray
    prompt_index: np.ndarray
    boxes: np.ndarray
    images: np.ndarray

    def __post_init__(self) -> None:
        prompts, layers = self.fp.shape[:2]
        if self.q.shape != self.fp.shape or self.fp.ndim != 4 or self.layers.shape != (layers,):
            raise ValueError(f"attention maps: fp {self.fp.shape}, q {self.q.shape} and layers {self.layers.shape} "
                             "must be (S, L, g, g), (S, L, g, g) and (L,)")
        sizes = {len(a) for a in (self.image_ids, self.prompt_index, self.boxes, self.images)}
        if sizes != {prompts}:
            raise ValueError(f"attention maps: {prompts} prompts in the maps but per-prompt arrays of lengths {sizes}")

    @property
    def grid(self) -> int:
        """Side g of the image-token grid."""
        return int(self.fp.shape[-1])


class _RowRecorder:
    """Per attention site, the head-mean `MASK_TOKEN_ROW` rows of every call, in call order."""

    def __init__(self, sites: int) -> None:
        self.rows: list[list[Tensor]] = [[] for _ in range(sites)]

    def __call__(self, index: int, P: Tensor) -> None:
        # P (B, heads, Nq, Nk) -> (B, Nk)
        self.rows[index].append(P[:, :, MASK_TOKEN_ROW].float().mean(dim=1).cpu())

    def stacked(self, grid: int) -> Tensor:
        """`(N, L, g, g)`: the rows of all calls, prompts along dim 0."""
        return torch.stack([torch.cat(calls) for calls in self.rows], dim=1).reshape(-1, len(self.rows), grid, grid)


def input_frame(predictor: SamBoxPredictor, image: np.ndarray, boxes: np.ndarray,
                side: int = IMAGE_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """The model-input frame of `image` (H, W, 3) uint8 and `boxes` (N, 4) xyxy (original pixels) in it.

    The frame is the predictor's (`SamBoxPredictor.input_frame`: SAM's long-side resize zero-padded to
    S x S, SAM2's square resize), shrunk to `min(side, S)` pixels a side, so the embedding grid's cells tile
    it. Returns the frame `(F, F, 3)` uint8 and the boxes `(N, 4)` float32 in its pixels.
    """
    frame, scaled = predictor.input_frame(image, boxes)
    img_size = frame.shape[0]
    out = min(side, img_size)
    if out != img_size:
        frame = np.asarray(Image.fromarray(frame).resize((out, out), Image.Resampling.BILINEAR))
    return frame, (scaled * (out / img_size)).astype(np.float32)


def collect_attention_maps(sam: nn.Module, dataset: CocoBoxPrompts, image_ids: Sequence[int], prompts_per_image: int,
                           *, max_boxes_per_batch: int = 64, source: EmbeddingSource | None = None) -> AttentionMaps:
    """The token->image maps (module docstring) of the first `prompts_per_image` prompts of each image.

    `sam` must hold the decoder's attention twins (`carsam.models.quantize.quantize_`); it runs in eval mode
    under no_grad and its quantizer modes and hooks are as before afterwards. Images without prompts are
    skipped. Raises ValueError if no image has a prompt, or `prompts_per_image` < 1.
    """
    if prompts_per_image < 1:
        raise ValueError(f"prompts_per_image must be >= 1, got {prompts_per_image}")
    sites = [s for s in attention_sites(sam, ("decoder",)) if s.token_to_image]
    predictor = box_predictor(sam, max_boxes_per_batch, source)
    grid = predictor.sam.prompt_encoder.image_embedding_size[0]
    parts: dict[str, list] = {name: [] for name in FIELDS if name != "layers"}
    with eval_no_grad(sam):
        for image_id in image_ids:
            boxes = dataset.prompts(image_id)[0][:prompts_per_image]
            if not len(boxes):
                continue
            for mode, name in ((QuantMode.FP, "fp"), (None, "q")):
                recorder = _RowRecorder(len(sites))
                with quant_modes_set(sam, mode), tap_probabilities(sites, recorder):
                    predictor.predict(predictor.embed_image(dataset, image_id), boxes)
                parts[name].append(recorder.stacked(grid).numpy())
            frame, framed_boxes = input_frame(predictor, dataset.load_image(image_id), boxes)
            parts["images"] += [frame] * len(boxes)
            parts["boxes"].append(framed_boxes)
            parts["image_ids"] += [image_id] * len(boxes)
            parts["prompt_index"] += list(range(len(boxes)))
    if not parts["fp"]:
        raise ValueError("none of the chosen images has a prompt box; pick images with prompts")
    return AttentionMaps(fp=np.concatenate(parts["fp"]).astype(np.float32),
                         q=np.concatenate(parts["q"]).astype(np.float32),
                         layers=np.array([s.layer for s in sites], dtype=np.int64),
                         image_ids=np.array(parts["image_ids"], dtype=np.int64),
                         prompt_index=np.array(parts["prompt_index"], dtype=np.int64),
                         boxes=np.concatenate(parts["boxes"]), images=np.stack(parts["images"]))


def write_attention_maps(run_dir: str | Path, maps: AttentionMaps) -> Path:
    """Write `run_dir/attention_maps.npz` atomically."""
    arrays = {name: getattr(maps, name) for name in FIELDS}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
            np.savez_compressed(fh, **arrays)
    return replace_atomic(Path(run_dir) / MAPS_FILE, write)


def read_attention_maps(run_dir: str | Path) -> AttentionMaps:
    """The maps of one run folder (no pickled objects are loaded). Raises OSError/ValueError/KeyError on a
    missing, corrupt or incomplete file."""
    with np.load(Path(run_dir) / MAPS_FILE, allow_pickle=False) as data:
        return AttentionMaps(**{name: data[name] for name in FIELDS})


def load_run_maps(run_dir: str | Path) -> AttentionMaps | None:
    """`read_attention_maps` of a run folder for readers of many runs: None when it has no maps file, and None
    with a warning when the file is unreadable."""
    path = Path(run_dir) / MAPS_FILE
    if not path.is_file():
        return None
    try:
        return read_attention_maps(run_dir)
    except (OSError, ValueError, KeyError) as err:
        logger.warning("skipping unreadable attention maps %s (%s)", path, err)
        return None


__all__ = ["IMAGE_SIDE", "MAPS_FILE", "MASK_TOKEN_ROW", "AttentionMaps", "collect_attention_maps", "input_frame",
           "load_run_maps", "read_attention_maps", "write_attention_maps"]

"""Helpers the tests import (plain functions and constants; the fixtures stay in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from carsam.data.synthetic import SyntheticSpec
from carsam.quant.quantizers import QuantMode
from carsam.quant.state import quant_modes_set
from carsam.recon.block_io import BlockIO

REPO = Path(__file__).resolve().parents[1]


SMALL_SPEC = SyntheticSpec(seed=7, num_images=(("train", 0), ("calib", 4), ("val", 6)))


BOX = torch.tensor([[8.0, 6.0, 40.0, 52.0]])


def decode_box(sam, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """SAM's single-mask outputs for the box `BOX` on `image` (1, 3, S, S): low-res masks (1, 1, h, w), IoU (1, 1)."""
    with torch.no_grad():
        embedding = sam.image_encoder(image)
        sparse, dense = sam.prompt_encoder(points=None, boxes=BOX, masks=None)
        return sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=False)


def experiment(name: str) -> str:
    """Absolute path of a shipped experiment file, so tests do not depend on the working directory."""
    return str(REPO / "experiments" / name)


def real_data_overrides(paths: dict[str, Path], **replace: Path) -> list[str]:
    """`data.*=...` overrides pointing the real-data path at `paths` (entries replaceable)."""
    merged = {**paths, **replace}
    keys = ("images", "annotations", "prompts", "calib_images", "calib_annotations")
    return [f"data.{k}={merged[k]}" for k in keys]


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def rerun_fp(sam: nn.Module, block_io: BlockIO) -> list[tuple[torch.Tensor, ...]]:
    """The unit's outputs on each cached sample's inputs with every quantizer of `sam` in FP mode."""
    unit = block_io.unit
    with quant_modes_set(sam, QuantMode.FP), torch.no_grad():
        return [unit.run(unit.module(sam), s.args, s.kwargs) for s in block_io.samples]

"""Fixtures for the model tests: the testbed SAM and a small prompted forward pass."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from segment_anything.modeling import Sam

from carsam.testbed.spec import build_testbed_sam

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def run_sam(sam: Sam, image: torch.Tensor, boxes: torch.Tensor) -> Outputs:
    """Image encoder + prompt encoder + mask decoder on one image `(1, 3, 128, 128)` and boxes `(K, 4)`.

    Returns image embeddings `(1, 256, 16, 16)`, low-res mask logits `(K, 1, 64, 64)`, IoU `(K, 1)`.
    """
    with torch.no_grad():
        embeddings = sam.image_encoder(image)
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        logits, iou = sam.mask_decoder(embeddings, sam.prompt_encoder.get_dense_pe(), sparse, dense,
                                       multimask_output=False)
    return embeddings, logits, iou


@pytest.fixture(scope="module")
def fp_testbed() -> Sam:
    """A seeded testbed SAM (do not modify: deep-copy it)."""
    torch.manual_seed(0)
    return build_testbed_sam()


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    """Three random normalised images `(1, 3, 128, 128)`: two for calibration, one for evaluation."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(1, 3, 128, 128, generator=gen) for _ in range(3)]


@pytest.fixture(scope="module")
def boxes() -> torch.Tensor:
    """Two box prompts `(2, 4)` in 128-px input coordinates."""
    return torch.tensor([[10.0, 12.0, 70.0, 64.0], [40.0, 30.0, 120.0, 100.0]])


@pytest.fixture(scope="module")
def forward(boxes: torch.Tensor) -> Callable[[Sam, torch.Tensor], Outputs]:
    """`forward(sam, image)`: `run_sam` with the fixture boxes."""
    return lambda sam, image: run_sam(sam, image, boxes)

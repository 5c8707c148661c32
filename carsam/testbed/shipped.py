"""The shipped testbeds: for each `model.type`, its checkpoint and card (beside this file), its architecture and
the synthetic data it was trained on; and how to build one.

- `testbed` (v1, the default and the fast tests'), `testbed_v2` (SAM-scale output tokens and no decay on
  embeddings, for larger token ranges; docs/testbed.md), `testbed_v2_glyphs` (v2's recipe on the second synthetic
  family, `glyphs` seed 1, to check that a conclusion is not tuned to one dataset), `testbed_v2_long` (v2's
  recipe for 7500 steps, whose FP quality passes v1's): the small SAM of `carsam.testbed.spec`.
- `sam2_testbed`: a small Hiera + SAM2's mask decoder (`carsam.testbed.sam2_spec`, docs/sam2.md).

Building the SAM2 one imports the `sam2` package, which nothing here does on import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segment_anything.modeling import Sam

from carsam.testbed.sam2_spec import (
    SAM2_TESTBED_TYPE,
    Sam2TestbedSpec,
    build_sam2_testbed,
    build_sam2_testbed_from_checkpoint,
)
from carsam.testbed.spec import TestbedSpec, build_testbed_from_checkpoint, build_testbed_sam

if TYPE_CHECKING:
    from carsam.models.sam2_image import Sam2ImageModel

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A testbed architecture: its spec, and how to build it at random (seed the global RNG first) or from a
    checkpoint (fp16-stored, upcast to fp32)."""

    spec: TestbedSpec | Sam2TestbedSpec
    build: Callable[[Any], Sam | Sam2ImageModel]
    from_checkpoint: Callable[[Path, Any], Sam | Sam2ImageModel]


# the v1 family's (segment_anything classes) and the SAM2 testbed's (the sam2 package's)
ARCHITECTURES = {"sam": Architecture(TestbedSpec(), build_testbed_sam, build_testbed_from_checkpoint),
                 "sam2": Architecture(Sam2TestbedSpec(), build_sam2_testbed, build_sam2_testbed_from_checkpoint)}


@dataclasses.dataclass(frozen=True)
class ShippedTestbed:
    """A trained testbed in the package: `checkpoint` and `card` (file names beside this module), its
    `architecture` (a key of `ARCHITECTURES`) and the synthetic `family` and `seed` of its training data (the
    card's `data_spec`)."""

    checkpoint_name: str
    card_name: str
    architecture: str = "sam"
    family: str = "shapes"
    seed: int = 0

    @property
    def checkpoint(self) -> Path:
        return HERE / self.checkpoint_name

    @property
    def card(self) -> Path:
        return HERE / self.card_name


SHIPPED_TESTBEDS = {
    "testbed": ShippedTestbed("testbed_sam.pth", "testbed.json"),
    "testbed_v2": ShippedTestbed("testbed_v2_sam.pth", "testbed_v2.json"),
    "testbed_v2_glyphs": ShippedTestbed("testbed_v2_glyphs_sam.pth", "testbed_v2_glyphs.json", family="glyphs", seed=1),
    "testbed_v2_long": ShippedTestbed("testbed_v2_long_sam.pth", "testbed_v2_long.json"),
    SAM2_TESTBED_TYPE: ShippedTestbed("sam2_testbed.pth", "sam2_testbed.json", architecture="sam2"),
}
TESTBED_CHECKPOINT = SHIPPED_TESTBEDS["testbed"].checkpoint  # the default testbed's, used by fast tests and benches


def build_shipped_testbed(model_type: str, checkpoint: str | Path | None = None) -> Sam | Sam2ImageModel:
    """The testbed `model_type` from its shipped checkpoint (or from `checkpoint`, a state dict of the same
    architecture), in eval mode."""
    testbed = SHIPPED_TESTBEDS[model_type]
    arch = ARCHITECTURES[testbed.architecture]
    return arch.from_checkpoint(Path(checkpoint) if checkpoint else testbed.checkpoint, arch.spec)


def build_random_testbed(model_type: str) -> Sam | Sam2ImageModel:
    """The architecture of testbed `model_type` with its own random initialisation (seed the global RNG first)."""
    arch = ARCHITECTURES[SHIPPED_TESTBEDS[model_type].architecture]
    return arch.build(arch.spec)

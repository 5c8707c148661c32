"""The SAM2 testbed's architecture: a small Hiera and SAM2's real mask decoder, built by the `sam2` package.

The model is `build_sam2` of the sam2.1 tiny config with Hydra overrides that shrink the encoder: a 256 px
square input (SAM2's patch embedding has stride 4 and the image embedding stride 16, so the embedding grid is
16 x 16, the v1 testbed's), a 6-block Hiera of widths 32/64/128/256 with windowed attention and one global
block, and a neck to 256 channels. The mask decoder keeps SAM2's real shape (transformer dim 256, depth 2,
8 heads, MLP 2048, attention downsample 2, the object-score token, the high-resolution features), as the v1
testbed keeps SAM's: that is where CAR-SAM acts. `sam2` is imported only when the model is built.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from carsam.models.checkpoint import apply_state_dict, load_state_dict

if TYPE_CHECKING:
    from carsam.models.sam2_image import Sam2ImageModel

SAM2_TESTBED_TYPE = "sam2_testbed"
BASE_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
# The testbed's default for SAM2's stability fallback (`Sam2ImageModel.stability_fallback`): off, because its
# training supervises the single-mask output only (mask token 0, carsam.testbed.train) and the multimask tokens
# the fallback would switch to keep their random initialisation (what it costs: docs/sam2.md).
SAM2_TESTBED_STABILITY_FALLBACK = False


@dataclasses.dataclass(frozen=True)
class Sam2TestbedSpec:
    """Architecture of the SAM2 testbed's image encoder (the decoder is the config's, SAM2's real one)."""

    __test__ = False  # not a pytest test class

    image_size: int = 256
    embed_dim: int = 32
    num_heads: int = 1
    stages: tuple[int, ...] = (1, 1, 3, 1)
    global_att_blocks: tuple[int, ...] = (4,)  # the last block of stage 3 (a block without Q pooling)
    window_spec: tuple[int, ...] = (8, 8, 8, 8)

    @property
    def channels(self) -> list[int]:
        """The trunk's output widths, deepest first (the neck's `backbone_channel_list`)."""
        return [self.embed_dim * 2 ** i for i in reversed(range(len(self.stages)))]

    def hydra_overrides(self) -> list[str]:
        """The overrides of `BASE_CONFIG` that build this architecture."""
        def listed(values: tuple[int, ...] | list[int]) -> str:
            return "[" + ",".join(str(v) for v in values) + "]"
        trunk = "++model.image_encoder.trunk"
        return [f"++model.image_size={self.image_size}", f"{trunk}.embed_dim={self.embed_dim}",
                f"{trunk}.num_heads={self.num_heads}", f"{trunk}.stages={listed(self.stages)}",
                f"{trunk}.global_att_blocks={listed(self.global_att_blocks)}",
                f"{trunk}.window_spec={listed(self.window_spec)}",
                f"++model.image_encoder.neck.backbone_channel_list={listed(self.channels)}"]


def build_sam2_testbed(spec: Sam2TestbedSpec = Sam2TestbedSpec()) -> Sam2ImageModel:
    """A randomly initialised SAM2 testbed (seed the global RNG first), in eval mode, with its stability fallback
    at `SAM2_TESTBED_STABILITY_FALLBACK`."""
    from carsam.models.sam2_build import build_sam2_architecture, image_model
    model = image_model(build_sam2_architecture(BASE_CONFIG, spec.hydra_overrides()), SAM2_TESTBED_TYPE)
    model.stability_fallback = SAM2_TESTBED_STABILITY_FALLBACK
    return model


def build_sam2_testbed_from_checkpoint(checkpoint: str | Path, spec: Sam2TestbedSpec = Sam2TestbedSpec()
                                       ) -> Sam2ImageModel:
    """Build the SAM2 testbed and load its (fp16-stored) state dict, upcast to fp32."""
    state = load_state_dict(checkpoint)
    return apply_state_dict(build_sam2_testbed(spec), state, SAM2_TESTBED_TYPE, checkpoint)

"""The architecture classes carsam recognises by type: SAM v1's, and SAM2's once the `sam2` package is loaded.

Units, spans, BIG and the diagnostics find their modules by type (never by name substrings). SAM2's decoder has
the same two-way transformer as SAM v1 (same layer, attention and norm names), in its own classes, and its
encoder is Hiera. Each function gives the tuple for `isinstance`. SAM2's classes are included only when `sam2`
has been imported (a SAM2 model exists only then); carsam never imports it just to check a type, because
importing it initialises Hydra's global state.
"""

from __future__ import annotations

import importlib
import sys

from segment_anything.modeling import image_encoder, transformer
from segment_anything.modeling.common import MLPBlock
from torch import nn

from carsam.models.adapters import QuantDecoderAttention


def _sam2(module: str, name: str) -> tuple[type[nn.Module], ...]:
    """`(sam2's class module.name,)` when the `sam2` package is loaded, else `()`."""
    if "sam2" not in sys.modules:
        return ()
    return (getattr(importlib.import_module(module), name),)


def two_way_transformers() -> tuple[type[nn.Module], ...]:
    """The mask decoders' two-way transformers."""
    return (transformer.TwoWayTransformer, *_sam2("sam2.modeling.sam.transformer", "TwoWayTransformer"))


def two_way_blocks() -> tuple[type[nn.Module], ...]:
    """Their layers (self-attention, token->image, MLP, image->token)."""
    return (transformer.TwoWayAttentionBlock, *_sam2("sam2.modeling.sam.transformer", "TwoWayAttentionBlock"))


def decoder_attentions() -> tuple[type[nn.Module], ...]:
    """The decoder attentions: SAM v1's, SAM2's, and their quantized twin `QuantDecoderAttention`."""
    return (transformer.Attention, QuantDecoderAttention, *_sam2("sam2.modeling.sam.transformer", "Attention"))


def sam2_attentions() -> tuple[type[nn.Module], ...]:
    """SAM2's attentions that `quantize_` replaces by twins (decoder `Attention`, Hiera `MultiScaleAttention`);
    empty while `sam2` is not loaded."""
    return (*_sam2("sam2.modeling.sam.transformer", "Attention"),
            *_sam2("sam2.modeling.backbones.hieradet", "MultiScaleAttention"))


def decoder_mlps() -> tuple[type[nn.Module], ...]:
    """The two-way blocks' MLPs."""
    return (MLPBlock, *_sam2("sam2.modeling.sam2_utils", "MLP"))


def encoder_blocks() -> tuple[type[nn.Module], ...]:
    """The image encoders' blocks: SAM v1's ViT `Block`, SAM2's Hiera `MultiScaleBlock`."""
    return (image_encoder.Block, *_sam2("sam2.modeling.backbones.hieradet", "MultiScaleBlock"))


def find_encoder_blocks(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every block of `encoder` (an `image_encoder`) with its path relative to it, in order."""
    return [(path, m) for path, m in encoder.named_modules() if isinstance(m, encoder_blocks())]

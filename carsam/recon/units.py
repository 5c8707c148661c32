"""Reconstruction units: which modules are optimised together, found by type, selected by name.

A unit is the module subtree rooted at one module path; its parameters (AdaRound `alpha`s, learnable
activation scales) are optimised together so that the subtree's output matches the FP model's output
of the same subtree. The groupings (the one place that defines them, `GROUPINGS`):

- `attention_mlp` (PTQ4SAM): each attention and each MLP of the decoder's two-way blocks, in call
  order (self, token->image, MLP, image->token), then the final token->image attention;
- `block`: each `TwoWayAttentionBlock` of the decoder, then the final token->image attention;
- `pair` (JCAR): per layer, its self-attention alone, then a span of its token->image attention, MLP
  and image->token attention (the two cross-attentions coupled through the MLP); then the final
  attention alone;
- `chain` (JCAR): layer 0's self-attention, token->image attention and MLP alone, then per layer i a
  span of layer i's image->token attention with layer i+1's self-attention and token->image attention
  (the keys written by image->token are read by the next token->image), layer i+1's MLP alone, and
  for the last layer a span of its image->token attention with the final attention. With depth L:
  3 single units, then L chain spans and L - 1 MLPs, interleaved;
- `decoder` (JCAR, the paper's largest granularity): the whole two-way transformer, every step of every
  layer and the final attention, as one span unit with one loss on both output streams;
- `encoder_block`: each image-encoder `Block`.

Modules are matched by class (segment_anything's and carsam's quantized twins), never by name; the
only names used are the two scopes of `carsam.models.quantize`. A unit runs itself on captured inputs
(`ReconUnit.run`) and returns its output streams as a tuple: a block or span gives (queries, keys).
Span units (`pair`, `chain`, `decoder`) have `steps`, names of `carsam.recon.spans` steps; their root module is
the decoder transformer and `ReconUnit.module` returns a `DecoderSpan` holding just those steps'
modules, so the stage optimises the quantizers of those steps only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from carsam.models.architecture import decoder_attentions, decoder_mlps, find_encoder_blocks, two_way_blocks
from carsam.models.quantize import DECODER_SCOPE, ENCODER_SCOPE
from carsam.recon.spans import DecoderSpan, DecoderStep, decoder_steps, final_step, layer_steps

logger = logging.getLogger(__name__)

SINGLE_STREAM = ("out",)
BLOCK_STREAMS = ("queries", "keys")
FINAL_ATTENTION = "final_attn_token_to_image"
BLOCK_ORDER = ("self_attn", "cross_attn_token_to_image", "mlp", "cross_attn_image_to_token")


@dataclasses.dataclass(frozen=True)
class ReconUnit:
    """One reconstruction unit.

    name: short label for records (`decoder.layers.0.self_attn`); path: the root module's path in the
    SAM (`mask_decoder.transformer.layers.0.self_attn`); kind: `attention`, `mlp`, `block`, `pair`,
    `chain`, `decoder` or `encoder_block`; streams: names of the output streams, in the order the module returns
    them; steps: for a span unit, the names of its decoder steps (`carsam.recon.spans`; `path` is then
    the decoder transformer's), empty otherwise.
    """

    name: str
    path: str
    kind: str
    streams: tuple[str, ...] = SINGLE_STREAM
    steps: tuple[str, ...] = ()

    def module(self, model: nn.Module) -> nn.Module:
        """The unit's module inside `model` (the SAM the unit was found in): its root module, or for a
        span unit a fresh `DecoderSpan` holding (by reference) the modules of its steps."""
        root = model.get_submodule(self.path)
        return DecoderSpan.from_transformer(root, self.steps) if self.steps else root

    @property
    def in_encoder(self) -> bool:
        """Whether the unit lies in the image encoder (then only the encoder runs to feed it)."""
        return self.path.startswith(ENCODER_SCOPE + ".")

    def run(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, ...]:
        """Call the unit's root `module` on captured inputs; the outputs as a tuple, one per stream.

        Decoder attention: q `(B, Nq, E)`, k/v `(B, Nk, E)` -> `((B, Nq, E),)`; decoder block or span:
        queries `(B, Nq, E)`, keys `(B, Nk, E)`, query_pe, key_pe -> `(queries, keys)`; encoder block:
        x `(1, H, W, C)` -> `((1, H, W, C),)`. B = the image's number of prompt boxes.
        """
        return as_streams(module(*args, **kwargs), len(self.streams))


def as_streams(output: Any, expected: int) -> tuple[Tensor, ...]:
    """A module output as a tuple of tensors; raises `ValueError` if it does not hold `expected` tensors."""
    streams = tuple(output) if isinstance(output, (tuple, list)) else (output,)
    if len(streams) != expected or not all(isinstance(s, Tensor) for s in streams):
        raise ValueError(f"expected {expected} tensor output(s), got {type(output).__name__} of {len(streams)}")
    return streams


def _short(path: str) -> str:
    return path.replace(DECODER_SCOPE, "decoder", 1).replace(ENCODER_SCOPE, "encoder", 1)


def _unit(path: str, kind: str, streams: tuple[str, ...] = SINGLE_STREAM) -> ReconUnit:
    return ReconUnit(_short(path), path, kind, streams)


def _decoder_blocks(sam: nn.Module) -> list[tuple[str, nn.Module]]:
    scope = sam.get_submodule(DECODER_SCOPE)
    return [(f"{DECODER_SCOPE}.{p}", m) for p, m in scope.named_modules()
            if isinstance(m, two_way_blocks())]


def _final_attention(sam: nn.Module) -> ReconUnit:
    path = f"{DECODER_SCOPE}.{FINAL_ATTENTION}"
    if not isinstance(sam.get_submodule(path), decoder_attentions()):
        raise TypeError(f"'{path}' is not a decoder attention")
    return _unit(path, "attention")


def attention_mlp_units(sam: nn.Module) -> list[ReconUnit]:
    """Each attention and MLP of every two-way block (call order), then the final attention."""
    units = []
    for block_path, block in _decoder_blocks(sam):
        for name in BLOCK_ORDER:
            child = block.get_submodule(name)
            if isinstance(child, decoder_attentions()):
                units.append(_unit(f"{block_path}.{name}", "attention"))
            elif isinstance(child, decoder_mlps()):
                units.append(_unit(f"{block_path}.{name}", "mlp"))
            else:
                raise TypeError(f"'{block_path}.{name}' is a {type(child).__name__}, not an attention or MLP")
    return units + [_final_attention(sam)]


def block_units(sam: nn.Module) -> list[ReconUnit]:
    """Each `TwoWayAttentionBlock` (two streams: queries, keys), then the final attention."""
    units = [_unit(path, "block", BLOCK_STREAMS) for path, _ in _decoder_blocks(sam)]
    return units + [_final_attention(sam)]


def _step_unit(step: DecoderStep) -> ReconUnit:
    """A single-step unit: the step's attention or MLP alone (as in `attention_mlp`)."""
    return _unit(f"{DECODER_SCOPE}.{step.name}", "mlp" if step.kind == "mlp" else "attention")


def _span_unit(label: str, kind: str, steps: list[DecoderStep]) -> ReconUnit:
    """A span unit `decoder.{label}` over `steps` (two streams: queries, keys)."""
    return ReconUnit(f"decoder.{label}", DECODER_SCOPE, kind, BLOCK_STREAMS, tuple(s.name for s in steps))


def pair_units(sam: nn.Module) -> list[ReconUnit]:
    """Per layer i: `layers.i.self_attn`, then the span `decoder.layers.i.pair` (token->image, MLP,
    image->token); then the final attention."""
    transformer = sam.get_submodule(DECODER_SCOPE)
    units = []
    for i, (self_attn, *rest) in enumerate(layer_steps(transformer)):
        units += [_step_unit(self_attn), _span_unit(f"layers.{i}.pair", "pair", rest)]
    return units + [_step_unit(final_step(transformer))]


def chain_units(sam: nn.Module) -> list[ReconUnit]:
    """Layer 0's self-attention, token->image and MLP alone; then per layer i the span
    `decoder.layers.i.chain` (layer i's image->token, then layer i+1's self-attention and token->image,
    or for the last layer the final attention), each followed by layer i+1's MLP alone."""
    transformer = sam.get_submodule(DECODER_SCOPE)
    layers = layer_steps(transformer)
    units = [_step_unit(step) for step in layers[0][:3]]
    for i, layer in enumerate(layers):
        following = layers[i + 1][:2] if i + 1 < len(layers) else [final_step(transformer)]
        units.append(_span_unit(f"layers.{i}.chain", "chain", [layer[3], *following]))
        if i + 1 < len(layers):
            units.append(_step_unit(layers[i + 1][2]))
    return units


def decoder_units(sam: nn.Module) -> list[ReconUnit]:
    """One span `decoder.all` over every decoder step (all layers, then the final attention)."""
    return [_span_unit("all", "decoder", decoder_steps(sam.get_submodule(DECODER_SCOPE)))]


def encoder_block_units(sam: nn.Module) -> list[ReconUnit]:
    """Each image-encoder block (SAM v1's ViT `Block`, SAM2's Hiera `MultiScaleBlock`), in order."""
    blocks = find_encoder_blocks(sam.get_submodule(ENCODER_SCOPE))
    return [_unit(f"{ENCODER_SCOPE}.{p}", "encoder_block") for p, _ in blocks]


GROUPINGS: dict[str, Callable[[nn.Module], list[ReconUnit]]] = {
    "attention_mlp": attention_mlp_units,
    "block": block_units,
    "pair": pair_units,
    "chain": chain_units,
    "decoder": decoder_units,
    "encoder_block": encoder_block_units,
}


DECODER_GROUPINGS = ("attention_mlp", "block", "pair", "chain", "decoder")  # the decoder units a method may choose
JOINT_GROUPINGS = ("block", "pair", "chain", "decoder")  # units spanning coupled token and image branches (JCAR)
ENCODER_GROUPINGS = ("encoder_block",)


def find_units(sam: nn.Module, grouping: str) -> list[ReconUnit]:
    """The units of `sam` for the grouping called `grouping` (see `GROUPINGS`), in reconstruction order."""
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown unit grouping '{grouping}'; valid: {', '.join(sorted(GROUPINGS))}")
    units = GROUPINGS[grouping](sam)
    logger.debug("grouping %s: %d units", grouping, len(units))
    return units


__all__ = ["BLOCK_STREAMS", "DECODER_GROUPINGS", "ENCODER_GROUPINGS", "GROUPINGS", "JOINT_GROUPINGS", "ReconUnit",
           "as_streams", "find_units"]

"""`quantize_(sam, QuantConfig)`: swap quantized modules into a SAM, in place.

What gets quantized (the published PTQ4SAM protocol, docs/methods.md, "The evaluation protocol"):
- in `image_encoder`: every block's attention (twin: `qkv`, `proj`, both MatMuls), its MLP Linears,
  and the neck's two Conv2d (`QuantConv2d`: the protocol's FP list does not name the neck and
  PTQ4SAM's code quantizes both neck convs; keep it FP with `("image_encoder.neck", {"enabled": False})`);
- in `mask_decoder.transformer`: every attention (twin: four projections, both MatMuls) and the MLPs.
What stays full precision (`FP_MODULES`, plus LayerNorms and the encoder's relative positions, which
are never swapped): patch embedding, positional embeddings, the prompt encoder, `output_upscaling`,
`output_hypernetworks_mlps`, `iou_prediction_head`.

SAM2 (`carsam.models.sam2_image.Sam2ImageModel`, the same two scope paths): in `image_encoder` every Hiera
block's attention (twin: `qkv`, `proj`, both MatMuls; Q pooling stays FP), its MLP and stage-change `proj`
Linears, and the FPN neck's convs; in `mask_decoder.transformer` what SAM v1 quantizes there. FP
(`SAM2_FP_MODULES`): the patch embedding and positional embeddings, the high-resolution convs `conv_s0`/`conv_s1`
(they feed the FP mask upscaling directly, as part of it), `no_mem_embed`, the prompt encoder, the mask
upscaling, the hypernetwork MLPs, the IoU head and the object-score head (unused by box prompting).

Modules are found by type (`segment_anything` Attention classes, `nn.Linear`, `nn.Conv2d`) inside the
two scopes; the only paths named are the scopes and the documented FP list. Weights: per output
channel; activations and MatMul operands: per tensor; the softmax probabilities always use an unsigned
(asymmetric, zero point 0) grid. New quantizers start in FP mode. The encoder's relative-position term
reads the quantized query by default (`rel_pos_query`, as PTQ4SAM's code; `fp`: the unquantized one).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections import Counter
from typing import Any

import torch
from segment_anything.modeling import image_encoder, transformer
from torch import nn

from carsam.models.adapters import (
    PROBS_QUANTIZER,
    REL_POS_QUERIES,
    QuantDecoderAttention,
    QuantEncoderAttention,
    QuantHieraAttention,
    quantize_linear,
)
from carsam.models.architecture import sam2_attentions
from carsam.models.sam2_image import Sam2ImageModel
from carsam.quant.modules import QuantConv2d, QuantLinear, QuantMatMul, quantized_weight_modules
from carsam.quant.observers import OBSERVERS
from carsam.quant.primitives import SYMMETRIC_SCALES, validate_bits
from carsam.quant.quantizers import UniformQuantizer

logger = logging.getLogger(__name__)

ENCODER_SCOPE = "image_encoder"
DECODER_SCOPE = "mask_decoder.transformer"
FP_MODULES: tuple[str, ...] = (
    "image_encoder.patch_embed",
    "image_encoder.pos_embed",  # a Parameter of the encoder, never swapped; listed for completeness
    "prompt_encoder",
    "mask_decoder.output_upscaling",
    "mask_decoder.output_hypernetworks_mlps",
    "mask_decoder.iou_prediction_head",
)
SAM2_FP_MODULES: tuple[str, ...] = (
    "image_encoder.trunk.patch_embed",
    "image_encoder.trunk.pos_embed",  # Parameters of the trunk, never swapped; listed for completeness
    "image_encoder.trunk.pos_embed_window",
    "image_encoder.conv_s0",
    "image_encoder.conv_s1",
    "image_encoder.no_mem_embed",
    "prompt_encoder",
    "mask_decoder.output_upscaling",
    "mask_decoder.output_hypernetworks_mlps",
    "mask_decoder.iou_prediction_head",
    "mask_decoder.pred_obj_score_head",
)
QUANT_TYPES = (QuantLinear, QuantConv2d, QuantMatMul, QuantDecoderAttention, QuantEncoderAttention, QuantHieraAttention,
               UniformQuantizer)


@dataclasses.dataclass(frozen=True)
class LayerSettings:
    """The quantization settings of one module (the config's defaults after its overrides)."""

    enabled: bool = True
    w_bits: int = 4
    a_bits: int = 4
    w_observer: str = "mse"
    a_observer: str = "minmax"
    w_symmetric: bool = False
    a_symmetric: bool = False
    symmetric_scale: str = "qmax"

    def __post_init__(self) -> None:
        for field in ("enabled", "w_symmetric", "a_symmetric"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field} must be true or false, got {getattr(self, field)!r}")
        if self.symmetric_scale not in SYMMETRIC_SCALES:
            raise ValueError(f"symmetric_scale must be one of {SYMMETRIC_SCALES}, got '{self.symmetric_scale}'")
        validate_bits(self.w_bits, "w_bits")
        validate_bits(self.a_bits, "a_bits")
        for field in ("w_observer", "a_observer"):
            if getattr(self, field) not in OBSERVERS:
                raise ValueError(f"{field} must be one of {sorted(OBSERVERS)}, got '{getattr(self, field)}'")


OVERRIDE_KEYS = frozenset(f.name for f in dataclasses.fields(LayerSettings))


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how. `overrides`: `(glob, {field: value})` pairs applied in order to every
    module whose path, or an ancestor's path, matches the `fnmatch` glob; fields are those of
    `LayerSettings` (`{"enabled": False}` keeps a module FP). Example:
    `(("mask_decoder.transformer.layers.0.*", {"w_bits": 8}),)`."""

    w_bits: int = 4
    a_bits: int = 4
    w_observer: str = "mse"
    a_observer: str = "minmax"
    w_symmetric: bool = False
    a_symmetric: bool = False
    symmetric_scale: str = "qmax"  # `half_range`: torch's / QDrop's absmax / (2^(b-1) - 0.5)
    quantize_encoder: bool = True
    quantize_decoder: bool = True
    rel_pos_query: str = "quantized"  # encoder rel-pos term from the quantized Q (PTQ4SAM's code) or `fp`
    overrides: tuple[tuple[str, dict[str, Any]], ...] = ()

    def __post_init__(self) -> None:
        if self.rel_pos_query not in REL_POS_QUERIES:
            raise ValueError(f"rel_pos_query must be one of {REL_POS_QUERIES}, got '{self.rel_pos_query}'")
        overrides = tuple((str(glob), dict(values)) for glob, values in self.overrides)
        object.__setattr__(self, "overrides", overrides)  # lists (from YAML) become tuples
        base = self.base_settings()
        for glob, values in overrides:
            unknown = sorted(set(values) - OVERRIDE_KEYS)
            if unknown:
                raise ValueError(f"override '{glob}' has unknown keys {unknown}; valid: {sorted(OVERRIDE_KEYS)}")
            dataclasses.replace(base, **values)  # validates the values

    def base_settings(self) -> LayerSettings:
        """The settings before any override."""
        return LayerSettings(True, self.w_bits, self.a_bits, self.w_observer, self.a_observer,
                             self.w_symmetric, self.a_symmetric, self.symmetric_scale)

    def settings_for(self, path: str) -> LayerSettings:
        """The settings of the module at `path` after the overrides that match it or an ancestor."""
        settings = self.base_settings()
        for glob, values in self.overrides:
            if path_matches(path, glob):
                settings = dataclasses.replace(settings, **values)
        return settings


def path_matches(path: str, glob: str) -> bool:
    """Whether `glob` (fnmatch) matches `path` or one of its ancestors (`a.b.c` -> `a`, `a.b`, `a.b.c`)."""
    parts = path.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), glob) for i in range(1, len(parts) + 1))


def fp_modules(model: nn.Module) -> tuple[str, ...]:
    """The documented FP list of `model`'s family: `SAM2_FP_MODULES` for SAM2, else `FP_MODULES`."""
    return SAM2_FP_MODULES if isinstance(model, Sam2ImageModel) else FP_MODULES


def is_fp_module(path: str, fp_list: tuple[str, ...] = FP_MODULES) -> bool:
    """Whether `path` is in `fp_list` (default SAM v1's `FP_MODULES`) or inside one of them."""
    return any(path == fp or path.startswith(fp + ".") for fp in fp_list)


class QuantizerMaker:
    """Quantizer factories for the modules under `prefix`, called with paths relative to it
    (e.g. `"q_proj.weight_quantizer"`); they return None where the owning module is disabled."""

    def __init__(self, config: QuantConfig, prefix: str, device: torch.device) -> None:
        self.config, self.prefix, self.device = config, prefix, device

    def _settings(self, rel: str) -> LayerSettings:
        owner = f"{self.prefix}.{rel}".rsplit(".", 1)[0]
        return self.config.settings_for(owner)

    def weight(self, rel: str) -> UniformQuantizer | None:
        """Per-output-channel weight quantizer."""
        s = self._settings(rel)
        if not s.enabled:
            return None
        return UniformQuantizer(s.w_bits, s.w_symmetric, ch_axis=0, observer=s.w_observer,
                                symmetric_scale=s.symmetric_scale).to(self.device)

    def act(self, rel: str) -> UniformQuantizer | None:
        """Per-tensor activation quantizer (unsigned for the softmax probabilities)."""
        s = self._settings(rel)
        if not s.enabled:
            return None
        symmetric = False if rel.endswith(PROBS_QUANTIZER) else s.a_symmetric
        return UniformQuantizer(s.a_bits, symmetric, ch_axis=None, observer=s.a_observer,
                                symmetric_scale=s.symmetric_scale).to(self.device)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def _quantized_twin(child: nn.Module, name: str, path: str, config: QuantConfig) -> nn.Module | None:
    """The quantized replacement of `child` (at `path`, named `name` in its parent), or None to recurse."""
    if isinstance(child, sam2_attentions()):
        from carsam.models.sam2_adapters import sam2_attention_twin
        maker = QuantizerMaker(config, path, _device(child))
        return sam2_attention_twin(child, maker.weight, maker.act)
    if isinstance(child, (transformer.Attention, image_encoder.Attention)):
        maker = QuantizerMaker(config, path, _device(child))
        if isinstance(child, transformer.Attention):
            return QuantDecoderAttention.from_attention(child, maker.weight, maker.act)
        return QuantEncoderAttention.from_attention(child, maker.weight, maker.act, config.rel_pos_query)
    maker = QuantizerMaker(config, path.rsplit(".", 1)[0], _device(child))
    if isinstance(child, nn.Linear):
        return quantize_linear(child, name, maker.weight, maker.act)
    if isinstance(child, nn.Conv2d):
        weight_q, input_q = maker.weight(f"{name}.weight_quantizer"), maker.act(f"{name}.input_quantizer")
        if weight_q is None and input_q is None:
            return child
        return QuantConv2d.from_conv2d(child, weight_q or nn.Identity(), input_q or nn.Identity())
    return None


def _swap_children(parent: nn.Module, prefix: str, config: QuantConfig, fp_list: tuple[str, ...]) -> None:
    """Replace, recursively and in place, the quantizable children of `parent` (at path `prefix`)."""
    for name, child in list(parent.named_children()):
        path = f"{prefix}.{name}"
        if is_fp_module(path, fp_list) or isinstance(child, QUANT_TYPES):
            continue
        twin = _quantized_twin(child, name, path, config)
        if twin is None:
            _swap_children(child, path, config, fp_list)
        elif twin is not child:
            setattr(parent, name, twin)


def quantize_(sam: nn.Module, config: QuantConfig = QuantConfig()) -> nn.Module:
    """Swap quantized twins into `sam` in place (see the module docstring) and return it.

    Parameters are shared with the original modules, so the state_dict keys only gain quantizer
    buffers (`*.scale`, `*.zero_point`). Every new quantizer is in FP mode.
    """
    scopes = [s for s, on in ((ENCODER_SCOPE, config.quantize_encoder), (DECODER_SCOPE, config.quantize_decoder)) if on]
    for scope in scopes:
        _swap_children(sam.get_submodule(scope), scope, config, fp_modules(sam))
    counts = Counter(type(m).__name__ for m in sam.modules() if isinstance(m, QUANT_TYPES))
    logger.info("quantize_: %s", dict(sorted(counts.items())))
    return sam


def calibrate_weights_(model: nn.Module) -> nn.Module:
    """Feed every `QuantLinear`/`QuantConv2d` weight to its weight observer (no data needed).

    The qparams are computed when the model is next switched to QUANTIZED (`carsam.quant.state.set_quant_mode`).
    """
    for _, module in quantized_weight_modules(model):
        module.calibrate_weight()
    return model

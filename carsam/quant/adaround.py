"""AdaRound (Nagel et al. 2020): a learned up/down rounding of each weight, swapped in by reconstruction.

An `AdaRoundQuantizer` replaces a calibrated per-channel `UniformQuantizer` of a `QuantLinear`/
`QuantConv2d` and keeps its qparams frozen. Each weight element gets a learnable `alpha`; the
rectified sigmoid `h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)` (zeta = 1.1,
gamma = -0.1) in [0, 1] says how much to round up:

    soft: (clamp(floor(w / s) + h(alpha) + z, qmin, qmax) - z) * s
    hard: the same with h(alpha) replaced by 1[h(alpha) >= 0.5]   (floor or floor + 1, never further)

`alpha` starts where `h` equals the fractional part of `w / s`, so the initial soft output reproduces
the weight wherever it lies inside the grid. `regularizer(beta)` pushes every `h` to 0 or 1.

Lifecycle: `enable_adaround_(layer)` -> reconstruction optimises `alpha` (soft) with the regulariser
-> `finalize_adaround_(model)` writes the hard-rounded, on-grid weight into the layer's `weight` and
puts the original `UniformQuantizer` back, which re-quantizes that weight to itself exactly.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from carsam.quant.fp_reference import remember_fp_
from carsam.quant.modules import QuantConv2d, QuantLinear
from carsam.quant.primitives import broadcast_to_axis
from carsam.quant.quantizers import QuantizerBase, QuantMode, UniformQuantizer

logger = logging.getLogger(__name__)

ZETA = 1.1
GAMMA = -0.1
WeightLayer = QuantLinear | QuantConv2d


def rectified_sigmoid(alpha: Tensor) -> Tensor:
    """`h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)`, elementwise."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    """An `alpha` with `rectified_sigmoid(alpha) == h` for `h` in [0, 1) (finite: h maps inside (0, 1))."""
    return torch.logit((h - GAMMA) / (ZETA - GAMMA))


class AdaRoundQuantizer(QuantizerBase):
    """Learned rounding of one weight tensor with the frozen qparams of `quantizer`.

    Args:
        quantizer: a calibrated `UniformQuantizer` (per channel along `ch_axis`, or per tensor).
        weight: the weight it quantizes, e.g. `(out, in)` or `(out, in, kh, kw)`; only its values at
            construction are used (to initialise `alpha`, same shape).

    Modes follow `QuantMode`: FP and CALIBRATE return the weight unchanged (the qparams are frozen,
    nothing to observe); QUANTIZED rounds softly (`soft=True`, the reconstruction phase) or hard.
    The replaced quantizer is kept outside the module tree (so `iter_quantizers` never sees it twice)
    and is what `finalize_adaround_` puts back.
    """

    original: UniformQuantizer
    scale: Tensor
    zero_point: Tensor

    def __init__(self, quantizer: UniformQuantizer, weight: Tensor) -> None:
        super().__init__(quantizer.bits)
        if not quantizer.is_calibrated:
            raise ValueError(f"AdaRound needs a calibrated quantizer; '{quantizer.path}' has no qparams")
        self.ch_axis, self.qmin, self.qmax = quantizer.ch_axis, quantizer.qmin, quantizer.qmax
        self.register_buffer("scale", quantizer.scale.detach().clone())
        self.register_buffer("zero_point", quantizer.zero_point.detach().clone())
        self.mode, self.path, self.soft = quantizer.mode, quantizer.path, True
        self.__dict__["original"] = quantizer  # not a submodule: see the class docstring
        rest = (weight.detach() * self._reciprocal(weight)).float()
        self.alpha = nn.Parameter(inverse_rectified_sigmoid(rest - torch.floor(rest)))

    def _reciprocal(self, w: Tensor) -> Tensor:
        return broadcast_to_axis(self.scale, w.dim(), self.ch_axis).reciprocal()

    @property
    def is_calibrated(self) -> bool:
        return True

    def h(self) -> Tensor:
        """The soft rounding offsets `h(alpha)` in [0, 1], the weight's shape."""
        return rectified_sigmoid(self.alpha)

    def rounded(self, w: Tensor, soft: bool) -> Tensor:
        """Soft or hard rounded `w` (the weight's shape), regardless of the mode.

        Gradients reach `alpha` only (soft); `floor(w / s)` is taken on the detached weight.
        """
        scale = broadcast_to_axis(self.scale, w.dim(), self.ch_axis)
        zero_point = broadcast_to_axis(self.zero_point, w.dim(), self.ch_axis)
        w_floor = torch.floor(w.detach() * scale.reciprocal())
        offset = self.h() if soft else (self.h() >= 0.5).to(w_floor.dtype)
        q = torch.clamp(w_floor + offset + zero_point, self.qmin, self.qmax)
        return ((q - zero_point) * scale).to(w.dtype)

    def forward(self, w: Tensor) -> Tensor:
        """w: the layer's weight, e.g. `(out, in)` or `(out, in, kh, kw)` -> the same shape and dtype.

        FP/CALIBRATE: `w`; QUANTIZED: `rounded(w, self.soft)`, with `alpha` of `w`'s shape and the frozen
        `scale`/`zero_point` of the replaced quantizer: `(C,)`, `C = w.shape[ch_axis]`, per channel
        (broadcast along `ch_axis`), or `()` per tensor."""
        if self.mode is not QuantMode.QUANTIZED:
            return w
        return self.rounded(w, self.soft)

    def regularizer(self, beta: float) -> Tensor:
        """`sum(1 - |2h - 1|^beta)`: 0 when every `h` is 0 or 1, largest (numel) at h = 0.5. Scalar."""
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    def eval_problems(self) -> list[str]:
        return super().eval_problems() + (["soft rounding"] if self.soft else [])

    def extra_repr(self) -> str:
        return f"bits={self.bits}, shape={tuple(self.alpha.shape)}, soft={self.soft}, mode={self.mode.value}"


def enable_adaround_(layer: WeightLayer) -> AdaRoundQuantizer:
    """Swap `layer.weight_quantizer` (a calibrated `UniformQuantizer`) for an `AdaRoundQuantizer`.

    Idempotent: a layer that already has one keeps it. Raises `ValueError` if the weight quantizer is
    not a `UniformQuantizer` (e.g. `nn.Identity`: FP weight) or is not calibrated yet.
    """
    current = layer.weight_quantizer
    if isinstance(current, AdaRoundQuantizer):
        return current
    if not isinstance(current, UniformQuantizer):
        raise ValueError(f"AdaRound needs a UniformQuantizer weight quantizer, got {type(current).__name__}")
    if not current.is_calibrated:
        raise ValueError(f"weight quantizer '{current.path}' is not calibrated: calibrate the weights "
                         "(calibrate_weights_ + set_quant_mode QUANTIZED) before enable_adaround_")
    adaround = AdaRoundQuantizer(current, layer.weight).to(layer.weight.device)
    layer.weight_quantizer = adaround
    return adaround


def adaround_modules(model: nn.Module) -> list[tuple[str, AdaRoundQuantizer]]:
    """Every `AdaRoundQuantizer` of `model` with its module path (their `alpha`s are what to optimise)."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, AdaRoundQuantizer)]


def set_soft_rounding(model: nn.Module, soft: bool) -> None:
    """Put every `AdaRoundQuantizer` of `model` in soft (`True`) or hard (`False`) rounding."""
    for _, quantizer in adaround_modules(model):
        quantizer.soft = soft


def _bake(layer: WeightLayer, adaround: AdaRoundQuantizer) -> None:
    """Write the hard-rounded weight into `layer.weight` (the original kept as its FP reference) and put the
    original quantizer back."""
    remember_fp_(layer, "weight")  # FP-mode passes after baking still see the original weight
    with torch.no_grad():
        layer.weight.copy_(adaround.rounded(layer.weight, soft=False))
    original: UniformQuantizer = adaround.original
    original.to(adaround.scale.device)
    original.mode, original.quant_prob = adaround.mode, adaround.quant_prob
    layer.weight_quantizer = original


def finalize_adaround_(model: nn.Module) -> nn.Module:
    """Bake the hard rounding of every AdaRound layer of `model` into its weight, in place.

    Afterwards each such layer's weight lies on its quantizer's grid, its weight quantizer is the
    original `UniformQuantizer` again (re-quantizing the baked weight returns it bit for bit), and no
    `AdaRoundQuantizer` is left. Raises `RuntimeError` if one is held elsewhere than as a weight quantizer.
    """
    layers = [(p, m) for p, m in model.named_modules()
              if isinstance(m, (QuantLinear, QuantConv2d)) and isinstance(m.weight_quantizer, AdaRoundQuantizer)]
    for _, layer in layers:
        _bake(layer, layer.weight_quantizer)  # type: ignore[arg-type]
    leftover = [path for path, _ in adaround_modules(model)]
    if leftover:
        raise RuntimeError(f"AdaRound quantizers outside a weight layer cannot be finalized: {leftover}")
    logger.info("finalize_adaround_: baked %d layers", len(layers))
    return model


__all__ = ["AdaRoundQuantizer", "adaround_modules", "enable_adaround_", "finalize_adaround_",
           "rectified_sigmoid", "set_soft_rounding"]

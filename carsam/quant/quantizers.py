"""Quantizer modules: the shared base, the uniform fake quantizer, and `iter_quantizers`.

Every quantizer derives from `QuantizerBase` (the uniform one here, `LogQuantizer` in `logquant.py`,
`AdaRoundQuantizer` in `adaround.py`), which is what `iter_quantizers` finds. A quantizer is in one of
three modes (`QuantMode`): FP (identity), CALIBRATE (feed the input to its observer, return it
unchanged) or QUANTIZED (fake-quantize with its qparams); every `forward` returns a tensor of its
input's shape. Modes and QDrop's `quant_prob` are plain attributes, not state_dict entries. The
model-wide toggles live in `carsam.quant.state`: `set_quant_mode` (switching to QUANTIZED also
finalizes pending calibrations), `quant_modes_set`, `set_quant_prob`, `assert_eval_ready`,
`fp_weights`, `eval_no_grad`.

QDrop (Wei et al. 2022): with `quant_prob < 1`, a QUANTIZED quantizer in training mode keeps each
element's quantized value with probability `quant_prob` and its FP value otherwise (PTQ4SAM's "drop
probability", 1.0 = always quantized). In eval mode, or at `quant_prob == 1`, the output is the
deterministic quantized value. `carsam.quant.state.assert_eval_ready` makes the PTQ4SAM evaluation bug
(`quant_prob` left below 1 on some quantizers; docs/methods.md, "The PTQ4SAM evaluation bug")
impossible to miss.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from carsam.quant.fused import fused_fake_quantize
from carsam.quant.observers import OBSERVERS, Observer, build_observer
from carsam.quant.primitives import SYMMETRIC_SCALES, fake_quantize, integer_range, qparams_from_range, validate_bits

logger = logging.getLogger(__name__)

QPARAM_NAMES = ("scale", "zero_point")


class QuantMode(str, Enum):
    """What a quantizer does in its forward pass."""

    FP = "fp"
    CALIBRATE = "calibrate"
    QUANTIZED = "quantized"


class QuantizerBase(nn.Module):
    """What every quantizer shares: `bits`, `mode`, `path` (for messages), QDrop's `quant_prob`.

    Subclasses implement `forward` and `is_calibrated`; those that learn qparams from data override
    `has_pending_calibration` and `finalize_calibration`; `eval_problems` may add their own checks.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = validate_bits(bits)
        self._mode = QuantMode.FP
        self._quant_prob = 1.0
        self.path = ""  # the module path, set by `set_quant_mode` for error messages

    @property
    def mode(self) -> QuantMode:
        """The current mode; assigning a string coerces it (`q.mode = "quantized"`)."""
        return self._mode

    @mode.setter
    def mode(self, value: QuantMode | str) -> None:
        self._mode = QuantMode(value)

    @property
    def quant_prob(self) -> float:
        """QDrop: probability that an element keeps its quantized value in training (1.0: always)."""
        return self._quant_prob

    @quant_prob.setter
    def quant_prob(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"quant_prob must be in [0, 1], got {value}")
        self._quant_prob = float(value)

    @property
    def is_calibrated(self) -> bool:
        """Whether the qparams hold values."""
        raise NotImplementedError

    @property
    def has_pending_calibration(self) -> bool:
        """Whether statistics wait to be turned into qparams by `finalize_calibration`."""
        return False

    def finalize_calibration(self) -> None:
        """Turn pending statistics into qparams (no-op for quantizers without an observer)."""

    def qdrop(self, x: Tensor, x_q: Tensor) -> Tensor:
        """QDrop mixing: `x_q` where a Bernoulli(`quant_prob`) draw succeeds, else `x`; `x`, `x_q` and the
        result share one shape (one draw per element).

        Active only in training mode with `quant_prob < 1`; otherwise returns `x_q` unchanged. Draws use
        the global RNG (seeded by the caller, like dropout).
        """
        keep = self.qdrop_keep(x)
        return x_q if keep is None else torch.where(keep, x_q, x)

    def qdrop_keep(self, x: Tensor, as_float: bool = False) -> Tensor | None:
        """QDrop's draw for `x`: a mask of `x`'s shape, True (or 1.0 with `as_float`, in float32) where the
        quantized value is kept, or None when QDrop is inactive (eval mode, or `quant_prob == 1`). Both forms
        come from the same draw of the global RNG."""
        if not self.training or self._quant_prob >= 1.0:
            return None
        draw = torch.rand_like(x, dtype=torch.float32)
        return draw.lt_(self._quant_prob) if as_float else draw < self._quant_prob

    def eval_problems(self) -> list[str]:
        """Why this quantizer is not ready for evaluation (empty when it is)."""
        problems = []
        if self.mode is not QuantMode.QUANTIZED:
            problems.append(f"mode={self.mode.value}")
        if self._quant_prob != 1.0:
            problems.append(f"quant_prob={self._quant_prob}")
        if not self.is_calibrated:
            problems.append("uncalibrated")
        return problems


class ObservingQuantizer(QuantizerBase):
    """A quantizer whose qparams come from an `observer` into a `scale` buffer (empty until calibrated).

    Subclasses create `self.observer` and register the `scale` buffer.
    """

    observer: Observer
    scale: Tensor

    @property
    def is_calibrated(self) -> bool:
        """Whether `scale` holds values (from calibration, explicit setting or a state dict)."""
        return self.scale.numel() > 0

    @property
    def has_pending_calibration(self) -> bool:
        """Whether the observer holds data not yet turned into qparams."""
        return self.observer.has_data


class UniformQuantizer(ObservingQuantizer):
    """Uniform affine fake quantizer, per tensor (`ch_axis=None`) or per channel along `ch_axis`.

    Args:
        bits: bit width in 2..16.
        symmetric: symmetric signed grid with zero point 0, else asymmetric unsigned grid.
        ch_axis: channel axis for per-channel qparams (0 for Linear/Conv weights), or None.
        observer: name of the range estimator (see `carsam.quant.observers.OBSERVERS`).
        symmetric_scale: `qmax` or `half_range`, the step of a symmetric grid (`qparams_from_range`).
        **observer_kwargs: passed to the observer (e.g. `percentile=99.9`, `grid=50`).

    Buffers `scale` and `zero_point` are empty until calibrated, then shape `()` per tensor or `(C,)`
    per channel; loading a state dict resizes them, so a calibrated checkpoint loads into a fresh one.
    `quant_prob` (QDrop, see the module docstring) defaults to 1.0. `fused` (default True) computes the
    fake quantization with `carsam.quant.fused.fused_fake_quantize`; False uses the reference composite.
    """

    zero_point: Tensor

    def __init__(
        self,
        bits: int,
        symmetric: bool = False,
        ch_axis: int | None = None,
        observer: str = "minmax",
        symmetric_scale: str = "qmax",
        **observer_kwargs: Any,
    ) -> None:
        super().__init__(bits)
        if symmetric_scale not in SYMMETRIC_SCALES:
            raise ValueError(f"symmetric_scale must be one of {SYMMETRIC_SCALES}, got '{symmetric_scale}'")
        self.symmetric, self.symmetric_scale = symmetric, symmetric_scale
        self.ch_axis = ch_axis
        self.qmin, self.qmax = integer_range(self.bits, symmetric)
        self.observer_name = observer
        self.observer = build_observer(observer, **self._observer_kwargs(observer, observer_kwargs))
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))
        self.fused = True  # `fused_fake_quantize` (False: the reference `fake_quantize`; same values, slower)

    def _observer_kwargs(self, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = {"ch_axis": self.ch_axis, **kwargs}
        if getattr(OBSERVERS.get(name), "uses_qspec", False):
            kwargs.update(bits=self.bits, symmetric=self.symmetric, symmetric_scale=self.symmetric_scale)
        return kwargs


    def forward(self, x: Tensor) -> Tensor:
        """x: any shape (an activation `(..., F)`, a MatMul operand, or a weight `(out, in[, kh, kw])`) ->
        the same shape and dtype.

        FP: `x`; CALIBRATE: observe `x` (per channel: statistics per index of `ch_axis`), return it;
        QUANTIZED: `fake_quantize(x, scale, zero_point, qmin, qmax, ch_axis)` (computed by
        `fused_fake_quantize`, equal to it bit for bit) with `scale`/`zero_point` of
        shape `()` per tensor or `(C,)`, `C = x.shape[ch_axis]`, per channel (broadcast along `ch_axis`),
        QDrop-mixed with `x` in training mode when `quant_prob < 1`. Raises RuntimeError in QUANTIZED
        mode before calibration."""
        if self.mode is QuantMode.FP:
            return x
        if self.mode is QuantMode.CALIBRATE:
            self.observer.observe(x)
            return x
        if not self.is_calibrated:
            raise RuntimeError(f"quantizer '{self.path or self.extra_repr()}' is in QUANTIZED mode but was "
                               "never calibrated: calibrate it (CALIBRATE mode + data, or set_qparams) first")
        if not self.fused:  # the reference composite, kept for benchmarks and debugging
            x_q = fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.ch_axis)
            return self.qdrop(x, x_q)
        return fused_fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.ch_axis,
                                   self.qdrop_keep(x, as_float=True))

    def finalize_calibration(self) -> None:
        """Set `scale`/`zero_point` from the observer's range, then reset the observer (frees its data)."""
        xmin, xmax = self.observer.compute_range()
        scale, zero_point = qparams_from_range(xmin, xmax, self.bits, self.symmetric,
                                               symmetric_scale=self.symmetric_scale)
        self.set_qparams(scale, zero_point)
        self.observer.reset()

    def set_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        """Set explicit qparams: shape `()` per tensor, `(C,)` per channel; `zero_point` integer-valued."""
        if scale.shape != zero_point.shape:
            raise ValueError(f"scale {tuple(scale.shape)} and zero_point {tuple(zero_point.shape)} differ in shape")
        if (self.ch_axis is None) != (scale.dim() == 0):
            raise ValueError(f"qparams of shape {tuple(scale.shape)} do not fit ch_axis={self.ch_axis}")
        with torch.no_grad():
            self._assign("scale", scale.detach().float())
            self._assign("zero_point", zero_point.detach().float())

    def _assign(self, name: str, value: Tensor) -> None:
        current = getattr(self, name)
        if isinstance(current, nn.Parameter):
            current.data = value.clone().to(current.device)
        else:
            setattr(self, name, value.clone())

    def make_scale_learnable(self) -> nn.Parameter:
        """Turn the `scale` buffer into an `nn.Parameter` (LSQ); the state_dict key stays `scale`."""
        if not self.is_calibrated:
            raise RuntimeError(f"quantizer '{self.path}' must be calibrated before its scale is made learnable")
        if not isinstance(self.scale, nn.Parameter):
            value = self.scale
            del self._buffers["scale"]
            self.scale = nn.Parameter(value.clone())
        return self.scale

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in QPARAM_NAMES:
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape != getattr(self, name).shape:
                # on the quantizer's device: loading a CPU state dict into a CUDA model keeps it on CUDA
                self._assign(name, torch.zeros_like(incoming, dtype=torch.float32, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        granularity = "per_tensor" if self.ch_axis is None else f"per_channel(axis={self.ch_axis})"
        sym = "asym" if not self.symmetric else "sym" if self.symmetric_scale == "qmax" else "sym(half_range)"
        drop = f", quant_prob={self.quant_prob}" if self.quant_prob != 1.0 else ""
        return f"bits={self.bits}, {sym}, {granularity}, observer={self.observer_name}, mode={self.mode.value}{drop}"


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, QuantizerBase]]:
    """Every quantizer (`QuantizerBase`) in `model` with its module path, in `named_modules` order."""
    for path, module in model.named_modules():
        if isinstance(module, QuantizerBase):
            yield path, module

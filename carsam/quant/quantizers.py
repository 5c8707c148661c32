"""Quantizer modules and the model-wide mode toggles.

A `UniformQuantizer` is in one of three modes (`QuantMode`): FP (identity), CALIBRATE (feed the input
to its observer, return it unchanged) or QUANTIZED (fake-quantize with its `scale`/`zero_point`).
`set_quant_mode` switches every quantizer of a model and finalizes the calibration of those whose
observer holds data when switching to QUANTIZED. Modes are plain attributes, not state_dict entries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from carsam.quant.observers import OBSERVERS, build_observer
from carsam.quant.primitives import fake_quantize, integer_range, qparams_from_range, validate_bits

logger = logging.getLogger(__name__)

QPARAM_NAMES = ("scale", "zero_point")


class QuantMode(str, Enum):
    """What a quantizer does in its forward pass."""

    FP = "fp"
    CALIBRATE = "calibrate"
    QUANTIZED = "quantized"


class UniformQuantizer(nn.Module):
    """Uniform affine fake quantizer, per tensor (`ch_axis=None`) or per channel along `ch_axis`.

    Args:
        bits: bit width in 2..16.
        symmetric: symmetric signed grid with zero point 0, else asymmetric unsigned grid.
        ch_axis: channel axis for per-channel qparams (0 for Linear/Conv weights), or None.
        observer: name of the range estimator (see `carsam.quant.observers.OBSERVERS`).
        **observer_kwargs: passed to the observer (e.g. `percentile=99.9`, `grid=50`).

    Buffers `scale` and `zero_point` are empty until calibrated, then shape `()` per tensor or `(C,)`
    per channel; loading a state dict resizes them, so a calibrated checkpoint loads into a fresh one.
    """

    def __init__(
        self,
        bits: int,
        symmetric: bool = False,
        ch_axis: int | None = None,
        observer: str = "minmax",
        **observer_kwargs: Any,
    ) -> None:
        super().__init__()
        self.bits = validate_bits(bits)
        self.symmetric = symmetric
        self.ch_axis = ch_axis
        self.qmin, self.qmax = integer_range(self.bits, symmetric)
        self.observer_name = observer
        self.observer = build_observer(observer, **self._observer_kwargs(observer, observer_kwargs))
        self._mode = QuantMode.FP
        self.path = ""  # the module path, set by `set_quant_mode` for error messages
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))

    def _observer_kwargs(self, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = {"ch_axis": self.ch_axis, **kwargs}
        if getattr(OBSERVERS.get(name), "uses_qspec", False):
            kwargs.update(bits=self.bits, symmetric=self.symmetric)
        return kwargs

    @property
    def mode(self) -> QuantMode:
        """The current mode; assigning a string coerces it (`q.mode = "quantized"`)."""
        return self._mode

    @mode.setter
    def mode(self, value: QuantMode | str) -> None:
        self._mode = QuantMode(value)

    @property
    def is_calibrated(self) -> bool:
        """Whether `scale` and `zero_point` hold values (from calibration, `set_qparams` or a state dict)."""
        return self.scale.numel() > 0

    def forward(self, x: Tensor) -> Tensor:
        """FP: `x`; CALIBRATE: observe `x`, return it; QUANTIZED: fake-quantized `x`. Shape preserved."""
        if self.mode is QuantMode.FP:
            return x
        if self.mode is QuantMode.CALIBRATE:
            self.observer.observe(x)
            return x
        if not self.is_calibrated:
            raise RuntimeError(f"quantizer '{self.path or self.extra_repr()}' is in QUANTIZED mode but was "
                               "never calibrated: calibrate it (CALIBRATE mode + data, or set_qparams) first")
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.ch_axis)

    def finalize_calibration(self) -> None:
        """Set `scale`/`zero_point` from the observer's range, then reset the observer (frees its data)."""
        xmin, xmax = self.observer.compute_range()
        scale, zero_point = qparams_from_range(xmin, xmax, self.bits, self.symmetric)
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
                self._assign(name, torch.zeros_like(incoming, dtype=torch.float32))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        granularity = "per_tensor" if self.ch_axis is None else f"per_channel(axis={self.ch_axis})"
        sym = "sym" if self.symmetric else "asym"
        return f"bits={self.bits}, {sym}, {granularity}, observer={self.observer_name}, mode={self.mode.value}"


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, UniformQuantizer]]:
    """Every `UniformQuantizer` in `model` with its module path, in `named_modules` order."""
    for path, module in model.named_modules():
        if isinstance(module, UniformQuantizer):
            yield path, module


def set_quant_mode(model: nn.Module, mode: QuantMode | str) -> None:
    """Put every quantizer of `model` in `mode`.

    Switching to QUANTIZED first finalizes the calibration of every quantizer whose observer holds data
    (activations observed in CALIBRATE mode, weights fed by `calibrate_weight`).
    """
    mode = QuantMode(mode)
    finalized = 0
    for path, quantizer in iter_quantizers(model):
        quantizer.path = path
        if mode is QuantMode.QUANTIZED and quantizer.observer.has_data:
            quantizer.finalize_calibration()
            finalized += 1
        quantizer.mode = mode
    logger.debug("quant mode -> %s (%d quantizers finalized)", mode.value, finalized)


def quant_modes(model: nn.Module) -> dict[str, QuantMode]:
    """The mode of every quantizer, by module path."""
    return {path: quantizer.mode for path, quantizer in iter_quantizers(model)}


def assert_quant_mode(model: nn.Module, mode: QuantMode | str) -> None:
    """Raise `AssertionError` listing the quantizers of `model` that are not in `mode`."""
    mode = QuantMode(mode)
    offending = {path: m.value for path, m in quant_modes(model).items() if m is not mode}
    if offending:
        raise AssertionError(f"{len(offending)} quantizer(s) not in mode '{mode.value}': {offending}")

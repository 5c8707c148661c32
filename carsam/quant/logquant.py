"""AGQ's log quantizer for softmax probabilities (PTQ4SAM's Adaptive Granularity Quantization).

Levels are powers of the base `2^(1/tau)`, `tau` in {1, 2, 4}: a larger `tau` gives finer levels
near the scale `s` but reaches less far down (the smallest level is `s * 2^(-(2^b - 1) / tau)`):

    code    = clamp(round(-tau * log2(p / s)), 0, 2^b - 1)
    dequant = s * 2^(-code / tau),   and 0 where round(-tau * log2(p / s)) > 2^b - 1 (p = 0 included)

Values below the smallest level map to 0 rather than to the smallest level (the convention of the
log2 softmax quantizers of FQ-ViT and PTQ4SAM). This spends one state beyond the 2^b codes on an
exact zero, and it is the right value for a softmax tail: rounding thousands of tiny token->image
probabilities (about 1/4096 each) up to the smallest level (e.g. 2^(-15/4) = 0.074 at tau = 4, 4 bits)
would inflate the row's mass many times over, whereas dropping them loses little. Values above `s`
clamp to code 0 (dequantized `s`).

`search_tau` picks `tau` per attention by the error of P·V, as AGQ does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from carsam.quant.observers import MinMaxObserver
from carsam.quant.quantizers import ObservingQuantizer, QuantMode

logger = logging.getLogger(__name__)

TAUS = (1, 2, 4)


def validate_tau(tau: int) -> int:
    """Return `tau` as an int if it is one of `TAUS`, else raise `ValueError`."""
    if isinstance(tau, bool) or tau not in TAUS:
        raise ValueError(f"tau must be one of {TAUS}, got {tau!r}")
    return int(tau)


def log_codes(p: Tensor, bits: int, tau: int, scale: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """Codes of `p` (any shape, values >= 0) and the mask of values mapped to 0, both `p`'s shape.

    `code = clamp(round(-tau * log2(p / s)), 0, 2^b - 1)` (float tensor with integer values);
    `zero` is True where the unclamped code exceeds `2^b - 1` (including `p = 0`).
    """
    raw = torch.round(-tau * torch.log2(p.float() / scale))
    levels = 2**bits
    return torch.clamp(raw, 0, levels - 1), raw > levels - 1


def log_fake_quantize(p: Tensor, bits: int, tau: int, scale: Tensor | float = 1.0) -> Tensor:
    """Log-quantize-dequantize `p`: `s * 2^(-code / tau)`, or 0 below the smallest level; `p`'s shape.

    No gradient flows through this function; `LogQuantizer` wraps it in a straight-through estimator.
    """
    with torch.no_grad():
        code, zero = log_codes(p, bits, tau, scale)
        value = torch.as_tensor(scale, dtype=torch.float32, device=p.device) * torch.exp2(-code / tau)
        return torch.where(zero, torch.zeros_like(value), value).to(p.dtype)


def log_levels(bits: int, tau: int, scale: float = 1.0) -> Tensor:
    """All values `log_fake_quantize` can return, 0 first then `s * 2^(-k / tau)` for k = 2^b - 1 .. 0: `(2^b + 1,)`."""
    codes = torch.arange(2**bits - 1, -1, -1, dtype=torch.float32)
    return torch.cat([torch.zeros(1), torch.as_tensor(scale, dtype=torch.float32) * torch.exp2(-codes / tau)])


class LogQuantizer(ObservingQuantizer):
    """Fake quantizer on the levels `s * 2^(-k / tau)` (and 0), per tensor, for softmax probabilities.

    Args:
        bits: bit width in 2..16 (`2^b` codes).
        tau: 1, 2 or 4 (base `2^(1/tau)`); set it later from `search_tau` with `set_tau`.
        scale: the largest level `s`. A float (default 1.0, the bound of a softmax) fixes it; None
            learns it as the maximum of the data seen in CALIBRATE mode.

    Modes as `UniformQuantizer`: FP identity; CALIBRATE observes the maximum when `scale=None`
    (passes through either way); QUANTIZED log-quantizes with a straight-through gradient, mixed with
    the FP input by QDrop in training mode when `quant_prob < 1`. `scale` is a buffer and `tau` is
    saved as extra state, so both travel in the state_dict.
    """

    def __init__(self, bits: int = 4, tau: int = 2, scale: float | None = 1.0) -> None:
        super().__init__(bits)
        self.tau = validate_tau(tau)
        self.scale_from_data = scale is None
        self.observer = MinMaxObserver()
        self.register_buffer("scale", torch.empty(0) if scale is None else torch.tensor(float(scale)))


    def finalize_calibration(self) -> None:
        """Set `scale` to the observed maximum (floored at a tiny positive value), reset the observer."""
        _, xmax = self.observer.compute_range()
        self.scale = torch.clamp(xmax.detach().float(), min=1e-8).to(self.scale.device)
        self.observer.reset()

    def set_tau(self, tau: int) -> None:
        """Choose the base `2^(1/tau)`."""
        self.tau = validate_tau(tau)

    def forward(self, x: Tensor) -> Tensor:
        """x: softmax probabilities, any shape (`(B, h, Nq, Nk)` in the decoder, `(B*h, HW, HW)` in the
        encoder) -> the same shape and dtype; `scale` is per tensor, shape `()`.

        FP: `x`; CALIBRATE: observe `x` (if learning the scale), return it; QUANTIZED: `log_fake_quantize(x)`
        with a straight-through gradient, QDrop-mixed with `x` in training mode when `quant_prob < 1`."""
        if self.mode is QuantMode.FP:
            return x
        if self.mode is QuantMode.CALIBRATE:
            if self.scale_from_data:
                self.observer.observe(x)
            return x
        if not self.is_calibrated:
            raise RuntimeError(f"log quantizer '{self.path}' is in QUANTIZED mode without a scale: calibrate it")
        x_q = log_fake_quantize(x, self.bits, self.tau, self.scale) + (x - x.detach())  # exact value, STE grad
        return self.qdrop(x, x_q)

    def get_extra_state(self) -> dict[str, Any]:
        return {"tau": self.tau}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.tau = validate_tau(state["tau"])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        incoming = state_dict.get(prefix + "scale")
        if incoming is not None and incoming.shape != self.scale.shape:
            self.scale = torch.zeros_like(incoming, dtype=torch.float32, device=self.scale.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        scale = "data" if self.scale_from_data else f"{float(self.scale):g}"
        return f"bits={self.bits}, tau={self.tau}, scale={scale}, mode={self.mode.value}"


def pv_error(probs: Tensor, values: Tensor, bits: int, tau: int, scale: Tensor | float = 1.0) -> Tensor:
    """`||Q(P) V - P V||^2` (a float64 scalar) for probs `(..., Nq, Nk)` and values `(..., Nk, d)`."""
    with torch.no_grad():
        diff = (log_fake_quantize(probs, bits, tau, scale).double() - probs.double()) @ values.double()
        return diff.square().sum()


def search_tau(probs: Tensor, values: Tensor, bits: int, taus: Sequence[int] = TAUS,
               scale: Tensor | float = 1.0) -> int:
    """The `tau` in `taus` minimising `||Q(P) V - P V||^2` (AGQ); ties go to the earlier `tau`.

    Args:
        probs: softmax probabilities `(..., Nq, Nk)`, e.g. `(B, heads, Nq, Nk)` from calibration.
        values: the matching values `(..., Nk, d)`.
        bits: bit width of the log quantizer.
        taus: candidates, each in `TAUS`.
        scale: the quantizer's scale `s`.
    """
    if not taus:
        raise ValueError("search_tau needs at least one candidate tau")
    errors = {validate_tau(t): float(pv_error(probs, values, bits, t, scale)) for t in taus}
    best = min(errors, key=errors.__getitem__)
    logger.debug("search_tau: errors %s -> tau=%d", errors, best)
    return best


__all__ = ["LogQuantizer", "TAUS", "log_codes", "log_fake_quantize", "log_levels", "pv_error", "search_tau"]

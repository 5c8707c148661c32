"""Quantized modules: `QuantLinear`, `QuantConv2d` (weights + inputs) and `QuantMatMul` (both operands).

`QuantLinear`/`QuantConv2d` keep the original module's `weight`/`bias` Parameters under the same
names, so their state_dict keys are a superset of `nn.Linear`'s/`nn.Conv2d`'s and FP checkpoints
load. Weights are calibrated from the weight itself (`calibrate_weight`), never from data: in
CALIBRATE mode the weight is observed once (if its observer is empty) and passed through unchanged.

Granularity, as `carsam.models.quantize.quantize_` builds the quantizers: weights per output channel
(`ch_axis=0`: scale and zero point `(out,)`), inputs and MatMul operands per tensor (`()`). A weight
quantizer may be swapped for an `AdaRoundQuantizer` during reconstruction, and `pv_matmul`'s
probability quantizer for AGQ's `LogQuantizer`; `nn.Identity` leaves that operand in full precision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn

from carsam.quant.quantizers import QuantizerBase, QuantMode, UniformQuantizer

Quantizer = UniformQuantizer | nn.Identity  # nn.Identity: that operand stays full precision


class _WeightQuantMixin:
    """Weight handling shared by the quantized weight layers."""

    weight: nn.Parameter
    weight_quantizer: Quantizer | QuantizerBase  # reconstruction may swap in an AdaRoundQuantizer

    def calibrate_weight(self) -> None:
        """Feed the weight to the weight quantizer's observer (replacing anything it had seen)."""
        quantizer = self.weight_quantizer
        if isinstance(quantizer, UniformQuantizer):
            quantizer.observer.reset()
            quantizer.observer.observe(self.weight.detach())

    def quantized_weight(self) -> Tensor:
        """The weight as used in the forward pass (fake-quantized in QUANTIZED mode), weight's shape."""
        quantizer = self.weight_quantizer
        if isinstance(quantizer, UniformQuantizer) and quantizer.mode is QuantMode.CALIBRATE:
            if not quantizer.observer.has_data:
                self.calibrate_weight()
            return self.weight
        return quantizer(self.weight)


class QuantLinear(_WeightQuantMixin, nn.Module):
    """`F.linear(input_quantizer(x), weight_quantizer(weight), bias)`.

    Shapes: x `(..., in_features)` -> `(..., out_features)`; weight `(out_features, in_features)`,
    quantized per output channel (`ch_axis=0`); the input per tensor.
    """

    def __init__(
        self, weight: nn.Parameter, bias: nn.Parameter | None, weight_quantizer: Quantizer, input_quantizer: Quantizer
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_quantizer: Quantizer, input_quantizer: Quantizer) -> QuantLinear:
        """Wrap `linear`, sharing its `weight`/`bias` Parameters."""
        # nn.Linear registers `weight` as an nn.Parameter; torch's annotation says only Tensor
        return cls(cast(nn.Parameter, linear.weight), linear.bias, weight_quantizer, input_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        """x `(..., in_features)` -> `(..., out_features)`.

        `input_quantizer` sees `x` (per tensor: scale, zero point `()`); `weight_quantizer` sees the weight
        `(out_features, in_features)` (per channel: scale, zero point `(out_features,)`); the bias stays FP.
        """
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantConv2d(_WeightQuantMixin, nn.Module):
    """`conv2d(input_quantizer(x), weight_quantizer(weight), bias)` with the wrapped conv's geometry.

    Shapes: x `(B, C_in, H, W)` -> `(B, C_out, H', W')`; weight `(C_out, C_in / groups, kH, kW)`, quantized
    per output channel; the input per tensor. Only `padding_mode="zeros"` is supported.
    """

    def __init__(self, conv: nn.Conv2d, weight_quantizer: Quantizer, input_quantizer: Quantizer) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d supports padding_mode='zeros' only, got '{conv.padding_mode}'")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight = cast(nn.Parameter, conv.weight)  # a Parameter; torch's annotation says only Tensor
        self.bias = conv.bias
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, weight_quantizer: Quantizer, input_quantizer: Quantizer) -> QuantConv2d:
        """Wrap `conv`, sharing its `weight`/`bias` Parameters."""
        return cls(conv, weight_quantizer, input_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        """x `(B, C_in, H, W)` -> `(B, C_out, H', W')` (the wrapped conv's stride, padding, dilation, groups).

        `input_quantizer` sees `x` (per tensor: `()` qparams); `weight_quantizer` sees the weight
        `(C_out, C_in / groups, kH, kW)` (per channel: `(C_out,)` qparams); the bias stays FP.
        """
        x, weight = self.input_quantizer(x), self.quantized_weight()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        c_out, c_in, kh, kw = self.weight.shape
        return f"{c_in * self.groups}, {c_out}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}"


MatMulEpilogue = Callable[[Tensor, Tensor, Tensor], Tensor]  # (product, lhs, quantized lhs) -> output


class QuantMatMul(nn.Module):
    """`lhs_quantizer(lhs) @ rhs_quantizer(rhs)`: a named MatMul whose inputs can be calibrated and hooked.

    Shapes: lhs `(..., M, K)`, rhs `(..., K, N)` -> `(..., M, N)` (torch.matmul broadcasting).
    """

    lhs_quantizer: Quantizer | QuantizerBase  # AGQ may swap in a LogQuantizer

    def __init__(self, lhs_quantizer: Quantizer, rhs_quantizer: Quantizer) -> None:
        super().__init__()
        self.lhs_quantizer = lhs_quantizer
        self.rhs_quantizer = rhs_quantizer

    def forward(self, lhs: Tensor, rhs: Tensor, epilogue: MatMulEpilogue | None = None) -> Tensor:
        """lhs `(..., M, K)`, rhs `(..., K, N)` -> `(..., M, N)`; each operand quantized per tensor (`()` qparams).

        `epilogue(product, lhs, lhs_q)`, if given, maps the product to the output, seeing the lhs operand before
        and after its quantizer (the encoder attention adds its relative-position term from the quantized query
        this way, as PTQ4SAM's code does, without calling the quantizer twice; forward hooks then see the result).

        In the attention twins (`carsam.models.adapters`): `qk_matmul`'s `lhs_quantizer` sees Q `(B, h, Nq, d)`
        (encoder: `Q * d^-0.5`, `(B*h, HW, d)`) and its `rhs_quantizer` Kᵀ `(B, h, d, Nk)` (encoder:
        `(B*h, d, HW)`); `pv_matmul`'s `lhs_quantizer` sees the softmax probabilities P `(B, h, Nq, Nk)`
        (unsigned grid, or AGQ's `LogQuantizer`) and its `rhs_quantizer` V `(B, h, Nk, d)` (encoder:
        `(B*h, HW, HW)` and `(B*h, HW, d)`).
        """
        lhs_q = self.lhs_quantizer(lhs)
        product = lhs_q @ self.rhs_quantizer(rhs)
        return product if epilogue is None else epilogue(product, lhs, lhs_q)


def quantized_weight_modules(model: nn.Module) -> list[tuple[str, QuantLinear | QuantConv2d]]:
    """Every `QuantLinear`/`QuantConv2d` of `model` with its module path."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]


__all__ = ["Quantizer", "QuantLinear", "QuantConv2d", "QuantMatMul", "quantized_weight_modules"]

"""Quantized twins of SAM's attention modules.

SAM's `Attention` modules (mask decoder: `segment_anything.modeling.transformer.Attention`; image
encoder: `segment_anything.modeling.image_encoder.Attention`) do their two MatMuls as plain tensor
ops. The twins route them through named `QuantMatMul`s (`qk_matmul`, `pv_matmul`) so every MatMul
input can be calibrated, hooked and compensated, and reproduce the original op order exactly: with
every quantizer in FP mode a twin's output is bit-identical to the original's.

Quantizers come from two factories called with the quantizer's path relative to the attention
(e.g. `"q_proj.weight_quantizer"`, `"qk_matmul.lhs_quantizer"`); a factory returning None leaves that
operand in full precision (a Linear whose weight and input factories both return None stays an
`nn.Linear`). The twins keep the original submodule and Parameter names, so state_dict keys are a
superset of the original's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from segment_anything.modeling import image_encoder
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks

from carsam.quant.modules import MatMulEpilogue, QuantLinear, QuantMatMul
from carsam.quant.quantizers import QuantizerBase, QuantMode, UniformQuantizer

QuantizerFactory = Callable[[str], UniformQuantizer | None]
LinearLayer = nn.Linear | QuantLinear  # what `quantize_linear` returns

QUERY_QUANTIZER = "qk_matmul.lhs_quantizer"  # Q (scaled by 1/sqrt(d) in the encoder)
KEY_QUANTIZER = "qk_matmul.rhs_quantizer"  # K transposed
PROBS_QUANTIZER = "pv_matmul.lhs_quantizer"  # softmax probabilities: unsigned
VALUE_QUANTIZER = "pv_matmul.rhs_quantizer"  # V


FP_KERNELS = ("explicit", "sdpa")  # how an attention twin computes its FP product: SAM v1's ops, or SAM2's kernel


def passes_through(quantizer: nn.Module) -> bool:
    """Whether `quantizer` returns its input unchanged now: `nn.Identity` or a quantizer in FP mode."""
    if isinstance(quantizer, nn.Identity):
        return True
    return isinstance(quantizer, QuantizerBase) and quantizer.mode is QuantMode.FP


def is_observed(module: nn.Module) -> bool:
    """Whether a forward (pre-)hook would see `module` or a module inside it run (global hooks included)."""
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def sdpa_is_exact(qk_matmul: QuantMatMul, pv_matmul: QuantMatMul) -> bool:
    """Whether a twin of a SAM2 attention may run SAM2's own `F.scaled_dot_product_attention` in place of its two
    named MatMuls: every operand quantizer passes its input through and nothing observes the MatMuls. Then the
    twin is bit-identical to the original (the explicit MatMuls agree with the fused kernel to float rounding,
    about 1e-7, but not bit for bit); calibration, diagnostics hooks and any quantized operand take the MatMuls.
    """
    quantizers = (qk_matmul.lhs_quantizer, qk_matmul.rhs_quantizer, pv_matmul.lhs_quantizer, pv_matmul.rhs_quantizer)
    return all(passes_through(q) for q in quantizers) and not (is_observed(qk_matmul) or is_observed(pv_matmul))


def quantize_linear(linear: nn.Linear, name: str, make_weight_q: QuantizerFactory,
                    make_act_q: QuantizerFactory) -> LinearLayer:
    """A `QuantLinear` sharing `linear`'s Parameters, or `linear` itself if both factories return None."""
    weight_q = make_weight_q(f"{name}.weight_quantizer")
    input_q = make_act_q(f"{name}.input_quantizer")
    if weight_q is None and input_q is None:
        return linear
    return QuantLinear.from_linear(linear, weight_q or nn.Identity(), input_q or nn.Identity())


def quant_matmul(name: str, make_act_q: QuantizerFactory) -> QuantMatMul:
    """A `QuantMatMul` whose operand quantizers come from `make_act_q` (`nn.Identity` where None)."""
    lhs = make_act_q(f"{name}.lhs_quantizer")
    rhs = make_act_q(f"{name}.rhs_quantizer")
    return QuantMatMul(lhs or nn.Identity(), rhs or nn.Identity())


class QuantDecoderAttention(nn.Module):
    """Twin of the mask decoder's `Attention` (optionally downscaled internal dim), SAM v1's or SAM2's.

    Forward: q `(B, Nq, E)`, k `(B, Nk, E)`, v `(B, Nk, E)` -> `(B, Nq, E)`, via per-head
    `qk_matmul(Q, Kᵀ)` `(B, h, Nq, Nk)`, `/ sqrt(d)`, softmax, `pv_matmul(P, V)` `(B, h, Nq, d)`.
    `fp_kernel="sdpa"` (SAM2's twins) runs `F.scaled_dot_product_attention`, as SAM2 does, while
    `sdpa_is_exact` holds.
    """

    def __init__(self, embedding_dim: int, internal_dim: int, num_heads: int, q_proj: LinearLayer, k_proj: LinearLayer,
                 v_proj: LinearLayer, out_proj: LinearLayer, qk_matmul: QuantMatMul, pv_matmul: QuantMatMul,
                 fp_kernel: str = "explicit") -> None:
        super().__init__()
        if fp_kernel not in FP_KERNELS:
            raise ValueError(f"fp_kernel must be one of {FP_KERNELS}, got '{fp_kernel}'")
        self.embedding_dim, self.internal_dim, self.num_heads = embedding_dim, internal_dim, num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        self.qk_matmul, self.pv_matmul = qk_matmul, pv_matmul
        self.fp_kernel = fp_kernel

    @classmethod
    def from_attention(cls, attn: Any, make_weight_q: QuantizerFactory, make_act_q: QuantizerFactory,
                       fp_kernel: str = "explicit") -> QuantDecoderAttention:
        """Build the twin of `attn` (`segment_anything`'s or `sam2`'s decoder `Attention`), sharing its Parameters."""
        linears = [quantize_linear(getattr(attn, n), n, make_weight_q, make_act_q)
                   for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
        projections = cast("tuple[LinearLayer, LinearLayer, LinearLayer, LinearLayer]", linears)  # one per name
        return cls(int(attn.embedding_dim), int(attn.internal_dim), int(attn.num_heads), *projections,
                   quant_matmul("qk_matmul", make_act_q), quant_matmul("pv_matmul", make_act_q), fp_kernel)

    @staticmethod
    def separate_heads(x: Tensor, num_heads: int) -> Tensor:
        """`(B, N, C)` -> `(B, heads, N, C / heads)` (a view)."""
        b, n, c = x.shape
        return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)

    @staticmethod
    def recombine_heads(x: Tensor) -> Tensor:
        """`(B, heads, N, d)` -> `(B, N, heads * d)`."""
        b, heads, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, heads * d)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self.separate_heads(self.q_proj(q), self.num_heads)
        k = self.separate_heads(self.k_proj(k), self.num_heads)
        v = self.separate_heads(self.v_proj(v), self.num_heads)
        if self.fp_kernel == "sdpa" and sdpa_is_exact(self.qk_matmul, self.pv_matmul):
            return self.out_proj(self.recombine_heads(F.scaled_dot_product_attention(q, k, v)))
        attn = self.qk_matmul(q, k.permute(0, 1, 3, 2))
        attn = attn / math.sqrt(q.shape[-1])
        attn = torch.softmax(attn, dim=-1)
        out = self.recombine_heads(self.pv_matmul(attn, v))
        return self.out_proj(out)

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, internal_dim={self.internal_dim}, num_heads={self.num_heads}, "
                f"fp_kernel={self.fp_kernel}")


REL_POS_QUERIES = ("quantized", "fp")  # which Q the encoder's relative-position term reads


class QuantEncoderAttention(nn.Module):
    """Twin of the image encoder's `Attention` (fused qkv, decomposed relative positions kept in FP).

    Forward: x `(B, H, W, C)` -> `(B, H, W, C)`, via `qk_matmul(Q * d^-0.5, Kᵀ)` `(B*h, HW, HW)`, plus
    the relative-position term, softmax, `pv_matmul(P, V)`.

    The relative-position term is added inside `qk_matmul`, as its epilogue, so `qk_matmul`'s output is the
    whole score. `rel_pos_query` says which queries it reads: `quantized` (PTQ4SAM's code: the quantized query,
    here `Q + (Q̂s - Qs) / s` with `s = d^-0.5` and `Q̂s` the lhs quantizer's output; exactly `Q` when that
    quantizer is in FP mode) or `fp` (the unquantized `Q`). The rel-pos tables themselves stay FP either way.
    """

    def __init__(self, num_heads: int, scale: float, qkv: LinearLayer, proj: LinearLayer, qk_matmul: QuantMatMul,
                 pv_matmul: QuantMatMul, rel_pos_h: nn.Parameter | None, rel_pos_w: nn.Parameter | None,
                 rel_pos_query: str = "quantized") -> None:
        super().__init__()
        if rel_pos_query not in REL_POS_QUERIES:
            raise ValueError(f"rel_pos_query must be one of {REL_POS_QUERIES}, got '{rel_pos_query}'")
        self.num_heads, self.scale, self.rel_pos_query = num_heads, scale, rel_pos_query
        self.qkv, self.proj = qkv, proj
        self.qk_matmul, self.pv_matmul = qk_matmul, pv_matmul
        self.use_rel_pos = rel_pos_h is not None
        if rel_pos_h is not None:
            self.rel_pos_h, self.rel_pos_w = rel_pos_h, rel_pos_w

    @classmethod
    def from_attention(cls, attn: image_encoder.Attention, make_weight_q: QuantizerFactory,
                       make_act_q: QuantizerFactory, rel_pos_query: str = "quantized") -> QuantEncoderAttention:
        """Build the twin of `attn`, sharing its Parameters (relative positions stay FP)."""
        rel_h = attn.rel_pos_h if attn.use_rel_pos else None
        rel_w = attn.rel_pos_w if attn.use_rel_pos else None
        return cls(attn.num_heads, attn.scale,
                   quantize_linear(attn.qkv, "qkv", make_weight_q, make_act_q),
                   quantize_linear(attn.proj, "proj", make_weight_q, make_act_q),
                   quant_matmul("qk_matmul", make_act_q), quant_matmul("pv_matmul", make_act_q), rel_h, rel_w,
                   rel_pos_query)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)  # each (B*heads, HW, d)
        epilogue = self._rel_pos_epilogue(q, h, w) if self.use_rel_pos else None
        attn = self.qk_matmul(q * self.scale, k.transpose(-2, -1), epilogue=epilogue)
        attn = attn.softmax(dim=-1)
        out = self.pv_matmul(attn, v).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)

    def _rel_pos_epilogue(self, q: Tensor, h: int, w: int) -> MatMulEpilogue:
        """Adds the relative-position term of `rel_pos_query`'s queries to the scores: `q` `(B*heads, HW, d)`,
        plus for `quantized` the lhs quantizer's error rescaled by `1 / scale` (zero, so `q` bit for bit, when
        that quantizer is FP)."""
        def add_rel_pos(scores: Tensor, scaled_q: Tensor, scaled_q_hat: Tensor) -> Tensor:
            query = q + (scaled_q_hat - scaled_q) / self.scale if self.rel_pos_query == "quantized" else q
            return image_encoder.add_decomposed_rel_pos(scores, query, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        return add_rel_pos

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, use_rel_pos={self.use_rel_pos}, rel_pos_query={self.rel_pos_query}"


class QuantHieraAttention(nn.Module):
    """Twin of Hiera's `MultiScaleAttention`.

    Forward: x `(B, H, W, C)` (B: images x windows) -> `(B, H', W', C_out)` (`H' = H / stride` when Q is pooled):
    `qkv` -> Q, K, V `(B, heads, HW, d)` (Q max-pooled in FP when `q_pool`), `qk_matmul(Q * d^-0.5, Kᵀ)`
    `(B, heads, H'W', HW)`, softmax, `pv_matmul(P, V)`, `proj`.
    """

    def __init__(self, dim_out: int, num_heads: int, qkv: LinearLayer, proj: LinearLayer, qk_matmul: QuantMatMul,
                 pv_matmul: QuantMatMul, q_pool: nn.Module | None) -> None:
        super().__init__()
        self.dim_out, self.num_heads = dim_out, num_heads
        self.qkv, self.proj, self.qk_matmul, self.pv_matmul = qkv, proj, qk_matmul, pv_matmul
        self.q_pool = q_pool  # the block's own MaxPool2d (shared, as in SAM2), or None
        self.scale = (dim_out // num_heads) ** -0.5  # SDPA's default scale

    @classmethod
    def from_attention(cls, attn: Any, make_weight_q: QuantizerFactory,
                       make_act_q: QuantizerFactory) -> QuantHieraAttention:
        """Build the twin of `attn` (SAM2's `MultiScaleAttention`), sharing its Parameters and Q-pooling module."""
        return cls(int(attn.dim_out), int(attn.num_heads), quantize_linear(attn.qkv, "qkv", make_weight_q, make_act_q),
                   quantize_linear(attn.proj, "proj", make_weight_q, make_act_q),
                   quant_matmul("qk_matmul", make_act_q), quant_matmul("pv_matmul", make_act_q), attn.q_pool)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).unbind(2)  # each (B, HW, heads, d)
        if self.q_pool is not None:
            q = self.q_pool(q.reshape(b, h, w, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # as hieradet.do_pool
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N, d)
        if sdpa_is_exact(self.qk_matmul, self.pv_matmul):
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            probs = self.qk_matmul(q * self.scale, k.transpose(-2, -1)).softmax(dim=-1)
            out = self.pv_matmul(probs, v)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))

    def extra_repr(self) -> str:
        return f"dim_out={self.dim_out}, num_heads={self.num_heads}, q_pool={self.q_pool is not None}"


AttentionTwin = QuantDecoderAttention | QuantEncoderAttention | QuantHieraAttention
ATTENTION_TWINS = (QuantDecoderAttention, QuantEncoderAttention, QuantHieraAttention)  # for isinstance

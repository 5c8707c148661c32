"""Which twin replaces which SAM2 attention (imports `sam2`; used by `quantize_` on a `Sam2ImageModel`).

SAM2's attentions call `F.scaled_dot_product_attention`, so neither Q·Kᵀ nor P·V exists as an op a hook could see.
The twins compute them as the named `QuantMatMul`s `qk_matmul` and `pv_matmul` (operands: `Q * d^-0.5` and Kᵀ,
then the softmax probabilities and V, as SAM v1's encoder twin), and run SAM2's fused kernel instead while
`carsam.models.adapters.sdpa_is_exact` holds, so a twin in FP mode is bit-identical to the original:

- the mask decoder's `Attention`: `QuantDecoderAttention` with `fp_kernel="sdpa"`;
- Hiera's `MultiScaleAttention` (fused `qkv`, optional max-pooling of Q at a stage change, windows handled by
  the block around it): `QuantHieraAttention`.
Both twins live in `carsam.models.adapters`, which does not import `sam2`.
`RoPEAttention` belongs to the video memory path, which `Sam2ImageModel` does not contain; it is refused.
"""

from __future__ import annotations

from sam2.modeling.backbones.hieradet import MultiScaleAttention
from sam2.modeling.sam.transformer import RoPEAttention
from torch import nn

from carsam.models.adapters import QuantDecoderAttention, QuantHieraAttention, QuantizerFactory


def sam2_attention_twin(attn: nn.Module, make_weight_q: QuantizerFactory,
                        make_act_q: QuantizerFactory) -> QuantDecoderAttention | QuantHieraAttention:
    """The twin of a SAM2 attention (`carsam.models.architecture.sam2_attentions`), sharing its Parameters."""
    if isinstance(attn, RoPEAttention):
        raise ValueError("RoPEAttention (SAM2's video memory attention) has no quantized twin; quantize the image "
                         "path only (carsam.models.sam2_image.Sam2ImageModel)")
    if isinstance(attn, MultiScaleAttention):
        return QuantHieraAttention.from_attention(attn, make_weight_q, make_act_q)
    if attn.dropout_p:
        raise ValueError(f"a SAM2 decoder attention with dropout {attn.dropout_p} has no exact twin (dropout 0 only)")
    return QuantDecoderAttention.from_attention(attn, make_weight_q, make_act_q, fp_kernel="sdpa")

"""quantize_ on the testbed SAM (and the module tree of vit_b on the meta device)."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam, image_encoder, transformer
from torch import nn

from carsam.models.adapters import QuantDecoderAttention, QuantEncoderAttention
from carsam.models.quantize import FP_MODULES, QuantConfig, calibrate_weights_, quantize_
from carsam.quant.modules import QuantConv2d, QuantLinear, QuantMatMul
from carsam.quant.quantizers import QuantMode, UniformQuantizer, iter_quantizers
from carsam.quant.state import assert_quant_mode, set_quant_mode

Forward = Callable[[Sam, torch.Tensor], tuple[torch.Tensor, ...]]
MINMAX = {"w_observer": "minmax"}  # the MSE weight search is tested in tests/quant; keep these fast


def _count(model: nn.Module, *types: type) -> int:
    return sum(isinstance(m, types) for m in model.modules())


def _calibrated(fp: Sam, config: QuantConfig, images: list[torch.Tensor], forward: Forward) -> Sam:
    sam = quantize_(copy.deepcopy(fp), config)
    set_quant_mode(sam, QuantMode.CALIBRATE)
    for image in images[:2]:
        forward(sam, image)
    set_quant_mode(sam, QuantMode.QUANTIZED)
    return sam


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def test_quantized_testbed_in_fp_mode_equals_fp_model(fp_testbed: Sam, images: list[torch.Tensor],
                                                      forward: Forward) -> None:
    sam = quantize_(copy.deepcopy(fp_testbed), QuantConfig())
    assert_quant_mode(sam, QuantMode.FP)
    for out, ref in zip(forward(sam, images[2]), forward(fp_testbed, images[2])):
        assert torch.equal(out, ref)


def test_w8a8_stays_close_to_fp_and_w4a4_is_further(fp_testbed: Sam, images: list[torch.Tensor],
                                                    forward: Forward) -> None:
    # Measured on this seeded testbed: W8A8 (min/max) ~0.020 relative error of the mask logits and
    # of the image embeddings, W4A4 ~0.3; 0.05 leaves 2.5x headroom for BLAS differences.
    ref = forward(fp_testbed, images[2])
    w8a8 = forward(_calibrated(fp_testbed, QuantConfig(8, 8, **MINMAX), images, forward), images[2])
    w4a4 = forward(_calibrated(fp_testbed, QuantConfig(4, 4, **MINMAX), images, forward), images[2])
    err8 = [_rel_err(o, r) for o, r in zip(w8a8, ref)]
    err4 = [_rel_err(o, r) for o, r in zip(w4a4, ref)]
    assert max(err8) < 0.05, err8
    assert err4[0] > 5 * err8[0] and err4[1] > 5 * err8[1], (err4, err8)


def test_quantized_checkpoint_round_trips_into_a_fresh_quantized_model(
        fp_testbed: Sam, images: list[torch.Tensor], forward: Forward) -> None:
    sam = _calibrated(fp_testbed, QuantConfig(4, 4, **MINMAX), images, forward)
    fresh = quantize_(copy.deepcopy(fp_testbed), QuantConfig(4, 4, **MINMAX))
    fresh.load_state_dict(sam.state_dict())
    set_quant_mode(fresh, QuantMode.QUANTIZED)
    assert torch.equal(forward(fresh, images[2])[1], forward(sam, images[2])[1])


def test_quantizer_counts_match_the_module_tree(fp_testbed: Sam) -> None:
    n_attn = _count(fp_testbed, transformer.Attention, image_encoder.Attention)
    n_linear = _count(fp_testbed.image_encoder, nn.Linear) + _count(fp_testbed.mask_decoder.transformer, nn.Linear)
    sam = quantize_(copy.deepcopy(fp_testbed), QuantConfig())
    assert _count(sam, QuantMatMul) == 2 * n_attn
    assert _count(sam, QuantDecoderAttention, QuantEncoderAttention) == n_attn
    assert _count(sam, transformer.Attention, image_encoder.Attention) == 0
    assert _count(sam, QuantLinear) == n_linear and _count(sam, QuantConv2d) == 2  # the neck
    assert _count(sam, UniformQuantizer) == 2 * (n_attn * 2 + n_linear + 2)


def test_fp_modules_contain_no_quantizer(fp_testbed: Sam) -> None:
    sam = quantize_(copy.deepcopy(fp_testbed), QuantConfig())
    paths = [p for p, _ in iter_quantizers(sam)]
    assert not [p for p in paths if any(p.startswith(fp + ".") for fp in FP_MODULES)]
    assert not [p for p in paths if not p.startswith(("image_encoder.", "mask_decoder.transformer."))]
    for fp in ("prompt_encoder", "mask_decoder.output_upscaling", "mask_decoder.iou_prediction_head"):
        assert [type(m) for m in sam.get_submodule(fp).modules()] == \
               [type(m) for m in fp_testbed.get_submodule(fp).modules()]


def test_state_dict_keys_extend_fp_keys_so_fp_checkpoints_load(fp_testbed: Sam) -> None:
    sam = quantize_(copy.deepcopy(fp_testbed), QuantConfig())
    assert set(fp_testbed.state_dict()) <= set(sam.state_dict())
    result = sam.load_state_dict(fp_testbed.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith((".scale", ".zero_point")) for k in result.missing_keys)


def test_quantize_leaks_no_process_wide_torch_state(fp_testbed: Sam) -> None:
    def snapshot() -> tuple[object, ...]:
        return (torch.is_grad_enabled(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
                torch.get_num_threads(), torch.get_rng_state().clone(), torch.backends.cudnn.benchmark,
                torch.is_inference_mode_enabled())

    before = snapshot()
    sam = quantize_(copy.deepcopy(fp_testbed), QuantConfig(4, 4, **MINMAX))
    calibrate_weights_(sam)
    set_quant_mode(sam, "quantized")
    after = snapshot()
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(before, after))


def test_overrides_disable_or_rebit_modules_by_glob(fp_testbed: Sam) -> None:
    config = QuantConfig(overrides=(("mask_decoder.transformer.layers.0.*", {"w_bits": 8}),
                                    ("image_encoder.neck", {"enabled": False}),
                                    ("*.final_attn_token_to_image.q_proj", {"enabled": False})))
    sam = quantize_(copy.deepcopy(fp_testbed), config)
    bits = {p: q.bits for p, q in iter_quantizers(sam)}
    assert bits["mask_decoder.transformer.layers.0.mlp.lin1.weight_quantizer"] == 8
    assert bits["mask_decoder.transformer.layers.0.mlp.lin1.input_quantizer"] == 4
    assert bits["mask_decoder.transformer.layers.1.mlp.lin1.weight_quantizer"] == 4
    assert _count(sam, QuantConv2d) == 0
    assert type(sam.mask_decoder.transformer.final_attn_token_to_image.q_proj) is nn.Linear


def test_softmax_probabilities_use_an_unsigned_grid_even_with_symmetric_activations(fp_testbed: Sam) -> None:
    sam = quantize_(copy.deepcopy(fp_testbed), QuantConfig(a_symmetric=True))
    for path, q in iter_quantizers(sam):
        if path.endswith("pv_matmul.lhs_quantizer"):
            assert not q.symmetric and q.qmin == 0
        elif path.endswith("qk_matmul.lhs_quantizer"):
            assert q.symmetric


def test_config_validates_bits_observers_and_override_keys() -> None:
    for bad in ({"w_bits": 1}, {"a_bits": 17}, {"w_bits": 3.5}, {"a_observer": "omse"},
                {"overrides": (("*", {"bitz": 8}),)}, {"overrides": (("*", {"a_bits": 1}),)}):
        with pytest.raises(ValueError):
            QuantConfig(**bad)  # type: ignore[arg-type]
    assert QuantConfig(overrides=[["*", {"w_bits": 8}]]).overrides == (("*", {"w_bits": 8}),)  # type: ignore[arg-type]


def test_quantize_twice_adds_nothing(fp_testbed: Sam) -> None:
    sam = quantize_(copy.deepcopy(fp_testbed), QuantConfig())
    n = len(list(iter_quantizers(sam)))
    assert len(list(iter_quantizers(quantize_(sam, QuantConfig())))) == n


def test_decoder_only_config_leaves_the_encoder_untouched(fp_testbed: Sam) -> None:
    sam = quantize_(copy.deepcopy(fp_testbed), QuantConfig(quantize_encoder=False))
    assert not list(iter_quantizers(sam.image_encoder)) and list(iter_quantizers(sam.mask_decoder))


def test_vit_b_module_tree_is_quantized_on_the_meta_device() -> None:
    with torch.device("meta"):
        sam = sam_model_registry["vit_b"]()
        keys = set(sam.state_dict())
        quantize_(sam, QuantConfig())
    counts = Counter(type(m).__name__ for m in sam.modules())
    assert counts["QuantEncoderAttention"] == 12 and counts["QuantDecoderAttention"] == 7
    assert counts["QuantMatMul"] == 38 and counts["QuantLinear"] == 12 * 4 + 2 * (4 * 3 + 2) + 4
    assert counts["QuantConv2d"] == 2 and keys <= set(sam.state_dict())


def test_mse_weight_ranges_beat_minmax_on_the_model_weights(fp_testbed: Sam) -> None:
    attn = "mask_decoder.transformer.final_attn_token_to_image"
    mse_config = QuantConfig(w_observer="minmax", overrides=((attn, {"w_observer": "mse"}),))
    models = [quantize_(copy.deepcopy(fp_testbed), c) for c in (mse_config, QuantConfig(**MINMAX))]
    errors = []
    for sam in models:
        calibrate_weights_(sam)
        set_quant_mode(sam, QuantMode.QUANTIZED)
        q_proj = sam.get_submodule(f"{attn}.q_proj")
        with torch.no_grad():
            errors.append(float((q_proj.quantized_weight() - q_proj.weight).square().sum()))
    assert sam.get_submodule(f"{attn}.q_proj.weight_quantizer").observer_name == "minmax"
    assert models[0].get_submodule(f"{attn}.q_proj.weight_quantizer").observer_name == "mse"
    assert errors[0] < errors[1]


def test_symmetric_scale_reaches_every_quantizer_and_its_observer(fp_testbed):
    import copy

    from carsam.quant.observers import MSEObserver

    sam = quantize_(copy.deepcopy(fp_testbed), QuantConfig(w_symmetric=True, symmetric_scale="half_range"))
    quantizers = [q for _, q in iter_quantizers(sam) if isinstance(q, UniformQuantizer)]
    assert quantizers and {q.symmetric_scale for q in quantizers} == {"half_range"}
    mse = [q.observer for q in quantizers if isinstance(q.observer, MSEObserver)]
    assert mse and {o.symmetric_scale for o in mse} == {"half_range"}
    assert "sym(half_range)" in repr(sam.mask_decoder.transformer.layers[0].mlp.lin1.weight_quantizer)


@pytest.mark.parametrize("rel_pos_query", ["quantized", "fp"])
def test_rel_pos_query_reaches_every_encoder_attention(fp_testbed, rel_pos_query):
    sam = quantize_(copy.deepcopy(fp_testbed), QuantConfig(rel_pos_query=rel_pos_query))
    encoder = [m for m in sam.image_encoder.modules() if isinstance(m, QuantEncoderAttention)]
    assert encoder and {m.rel_pos_query for m in encoder} == {rel_pos_query}

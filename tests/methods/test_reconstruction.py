"""brecq / qdrop / ptq4sam end to end on the random testbed (2 calibration images, 10 iterations per unit)."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import Sam

from carsam.config import ConfigError, ReconConfig, RunConfig, resolve
from carsam.methods.big import fold_signs_
from carsam.methods.calibrate import quantize_calibrate_
from carsam.methods.ptq4sam import (
    adopt_log_softmax_,
    adopt_searched_taus_,
    collect_fp_statistics,
    fold_bimodal_keys_,
    fp_calibration_pass,
    integrate_bimodal_keys_,
    softmax_attentions,
    token_to_image_attentions,
)
from carsam.methods.registry import get_method
from carsam.models.adapters import QuantDecoderAttention
from carsam.models.quantize import QuantConfig, quantize_
from carsam.quant.adaround import AdaRoundQuantizer
from carsam.quant.logquant import TAUS, LogQuantizer
from carsam.quant.quantizers import QuantMode, iter_quantizers
from carsam.quant.state import assert_eval_ready
from carsam.recon.block_io import block_io_loss, capture_block_io
from carsam.recon.driver import UnitRecipe, reconstruct_model_, subsample
from carsam.recon.units import find_units
from carsam.run_context import RunContext
from carsam.testbed.spec import build_testbed_from_checkpoint
from tests.helpers import experiment

FAST = ReconConfig(iters=10, track_interference=False)  # interference: tests/recon/test_interference.py


def _apply(method: str, checkpoint, calib, quant: QuantConfig | None = None) -> tuple[Sam, dict]:
    quant = QuantConfig() if quant is None else quant
    torch.manual_seed(0)
    sam = build_testbed_from_checkpoint(checkpoint)
    details = get_method(method).apply(sam, calib, RunConfig(method=method, quant=quant, recon=FAST), RunContext())
    return sam, details


@pytest.fixture(scope="module")
def applied(random_testbed_checkpoint, calib2) -> dict[str, tuple[Sam, dict]]:
    """Each method applied once: brecq decoder-only, qdrop and ptq4sam on encoder and decoder."""
    decoder_only = QuantConfig(quantize_encoder=False)
    return {"brecq": _apply("brecq", random_testbed_checkpoint, calib2, decoder_only),
            "qdrop": _apply("qdrop", random_testbed_checkpoint, calib2),
            "ptq4sam": _apply("ptq4sam", random_testbed_checkpoint, calib2)}


def _forward(sam: Sam) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-res mask logits `(2, 1, 64, 64)` and IoU `(2, 1)` of two boxes on a fixed random image."""
    image = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0], [40.0, 30.0, 120.0, 100.0]])
    with torch.no_grad():
        embedding = sam.image_encoder(image)
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        return sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False)


@pytest.mark.parametrize("method", ["brecq", "qdrop", "ptq4sam"])
def test_method_leaves_an_eval_ready_model_and_records_curves(applied, method):
    sam, details = applied[method]
    assert_eval_ready(sam)  # hard rounding, quant_prob 1, QUANTIZED, calibrated
    assert not any(isinstance(q, AdaRoundQuantizer) for _, q in iter_quantizers(sam))
    recon = details["recon"].record()
    assert recon["settings"]["iters"] == 10 and recon["num_units"] == len(recon["units"]) > 0
    for unit in recon["units"]:
        assert unit["steps"] == 10 and set(unit["first"]) == set(unit["last"]) == set(unit["curve"])
        assert "total" in unit["curve"] and len(unit["curve"]["total"]) == 10
    encoder_units = [u for u in recon["units"] if u["unit"].startswith("encoder.")]
    assert bool(encoder_units) == (method != "brecq")


def test_brecq_learns_no_activation_step_and_qdrop_does(applied):
    def learned(sam):
        return sum(isinstance(q.scale, torch.nn.Parameter) for _, q in iter_quantizers(sam) if hasattr(q, "scale"))
    assert learned(applied["brecq"][0]) == 0
    assert learned(applied["qdrop"][0]) > 0
    assert applied["qdrop"][1]["recon"].record()["recipe"] == {"learn_act_scales": True, "quant_prob": 0.5}
    assert applied["brecq"][1]["recon"].record()["recipe"] == {"learn_act_scales": False, "quant_prob": 1.0}


@pytest.mark.parametrize("method", ["brecq", "qdrop", "ptq4sam"])
def test_reconstructed_model_evaluates_deterministically(applied, method):
    sam = applied[method][0]
    sam.eval()
    first, second = _forward(sam), _forward(sam)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_agq_puts_log_quantizers_on_every_decoder_softmax(applied):
    sam, details = applied["ptq4sam"]
    decoder = [(p, m) for p, m in sam.mask_decoder.transformer.named_modules() if isinstance(m, QuantDecoderAttention)]
    assert len(decoder) == 7
    for _, attn in decoder:
        quantizer = attn.pv_matmul.lhs_quantizer
        assert isinstance(quantizer, LogQuantizer) and quantizer.tau in TAUS and quantizer.mode is QuantMode.QUANTIZED
    encoder_probs = [m.pv_matmul.lhs_quantizer for m in sam.image_encoder.modules() if hasattr(m, "pv_matmul")]
    assert encoder_probs and all(isinstance(q, LogQuantizer) for q in encoder_probs)  # agq_encoder on (default)
    assert {r["tau"] for r in details["agq"].values()} <= set(TAUS)
    assert len(details["agq"]) == 7 + len(encoder_probs)
    assert len(details["big"]) == 3


def test_agq_encoder_off_keeps_the_encoder_probabilities_uniform(random_testbed_checkpoint, calib2):
    torch.manual_seed(0)
    sam = build_testbed_from_checkpoint(random_testbed_checkpoint)
    config = RunConfig(method="ptq4sam", recon=ReconConfig(iters=1, agq_encoder=False, track_interference=False))
    details = get_method("ptq4sam").apply(sam, calib2, config, RunContext())
    encoder_probs = [m.pv_matmul.lhs_quantizer for m in sam.image_encoder.modules() if hasattr(m, "pv_matmul")]
    assert encoder_probs and not any(isinstance(q, LogQuantizer) for q in encoder_probs)
    assert len(details["agq"]) == 7 and all(p.startswith("mask_decoder.") for p in details["agq"])


def _scores(sam: Sam, calib) -> list[torch.Tensor]:
    """FP q·kᵀ of every token->image attention over `calib`, call by call."""
    scores: list[torch.Tensor] = []
    hooks = [attn.qk_matmul.register_forward_hook(lambda m, a, out: scores.append(out.clone()))
             for attn in token_to_image_attentions(sam).values()]
    fp_calibration_pass(sam, calib)
    for hook in hooks:
        hook.remove()
    return scores


def test_big_fold_leaves_fp_scores_unchanged(random_testbed_checkpoint, calib2):
    sam = build_testbed_from_checkpoint(random_testbed_checkpoint)
    quantize_(sam, QuantConfig(quantize_encoder=False))
    before = _scores(sam, calib2)
    k_weight = sam.mask_decoder.transformer.final_attn_token_to_image.k_proj.weight.detach().clone()
    report = integrate_bimodal_keys_(sam, calib2, threshold=-1.0)  # force folding on the random testbed
    assert all(r["folded"] for r in report.values()) and any(r["negated_channels"] > 0 for r in report.values())
    assert not torch.equal(sam.mask_decoder.transformer.final_attn_token_to_image.k_proj.weight, k_weight)
    after = _scores(sam, calib2)
    assert len(before) == len(after) > 0
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_fold_signs_is_an_involution_on_a_quantized_twin(random_testbed_checkpoint):
    sam = build_testbed_from_checkpoint(random_testbed_checkpoint)
    quantize_(sam, QuantConfig(quantize_encoder=False))
    attn = sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    weight = attn.q_proj.weight.detach().clone()
    signs = torch.where(torch.arange(attn.q_proj.weight.shape[0]) % 3 == 0, -1.0, 1.0)
    fold_signs_(fold_signs_(attn, signs), signs)
    assert torch.equal(attn.q_proj.weight, weight)


def test_brecq_reconstruction_lowers_a_unit_loss_from_rtn(random_testbed_checkpoint, calib2):
    torch.manual_seed(0)
    sam = build_testbed_from_checkpoint(random_testbed_checkpoint)
    config = RunConfig(method="brecq", quant=QuantConfig(w_observer="minmax", quantize_encoder=False))
    quantize_calibrate_(sam, calib2, config, RunContext())
    unit = find_units(sam, "attention_mlp")[2]  # layers.0.mlp (see the report: attention units need more)
    cache = capture_block_io(sam, unit, calib2, inputs="quantized")
    rtn = block_io_loss(sam, cache)
    recon = ReconConfig(iters=120, alpha_lr=1e-2)
    record = reconstruct_model_(sam, calib2, recon, UnitRecipe(), units=[unit]).record()
    assert record["num_units"] == 1 and record["baked_layers"] == 2
    assert block_io_loss(sam, cache) < rtn


def test_subsample_keeps_ends_and_caps_length():
    values = [float(i) for i in range(1000)]
    picked = subsample(values, 50)
    assert len(picked) == 50 and picked[0] == 0.0 and picked[-1] == 999.0
    assert subsample(values[:5], 50) == values[:5]


def test_recon_config_defaults_overrides_and_unknown_keys():
    config = resolve(experiment("qdrop_w4a4.yaml"), ["recon.iters=20000", "recon.grouping=block"])
    assert config.recon.iters == 20000 and config.recon.grouping == "block" and config.recon.quant_prob == 0.5
    assert resolve(experiment("ptq4sam_w4a4_decoder_only.yaml")).quant.quantize_encoder is False
    with pytest.raises(ConfigError, match="recon.bogus"):
        resolve(None, ["method=brecq", "recon.bogus=1"])
    with pytest.raises(ConfigError, match="recon.grouping"):
        resolve(None, ["recon.grouping=encoder_block"])
    for name in ("brecq", "qdrop", "ptq4sam"):
        for bits in (4, 6):
            config = resolve(experiment(f"{name}_w{bits}a{bits}.yaml"))
            assert config.method == name and config.quant.w_bits == config.quant.a_bits == bits


def test_big_and_agq_share_one_fp_pass_bit_for_bit(random_testbed_checkpoint, calib2):
    """PTQ4SAM's preparation collects BIG's keys and AGQ's tau errors in one FP pass, before folding: folding
    signs into q_proj/k_proj leaves every FP score exact, so the errors equal those of a pass after BIG."""
    separate = quantize_(build_testbed_from_checkpoint(random_testbed_checkpoint), QuantConfig(quantize_encoder=False))
    big_report = integrate_bimodal_keys_(separate, calib2, threshold=-1.0)  # force folding on the random testbed
    agq_report = adopt_log_softmax_(separate, calib2)  # its own FP pass, on the folded model
    shared = quantize_(build_testbed_from_checkpoint(random_testbed_checkpoint), QuantConfig(quantize_encoder=False))
    big, agq = token_to_image_attentions(shared), softmax_attentions(shared, encoder=False)
    keys, searches = collect_fp_statistics(shared, calib2, big, agq)
    assert fold_bimodal_keys_(big, keys, threshold=-1.0) == big_report
    assert any(r["negated_channels"] > 0 for r in big_report.values())
    assert adopt_searched_taus_(agq, searches) == agq_report  # every candidate's error, exactly
    for (name, a), (_, b) in zip(separate.state_dict().items(), shared.state_dict().items(), strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name

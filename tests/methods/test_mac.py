"""MatMul-Aware Compensation: exactness of the closed-form fits, held-out gains, identity at strength 0,
the singular-system error, and `apply_mac_` end to end on the random testbed."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from segment_anything.modeling import Sam, image_encoder, transformer
from torch import Tensor

from carsam.config import MacConfig, RunConfig
from carsam.methods.calibrate import quantize_calibrate_
from carsam.methods.mac import apply_mac_, attention_errors, correct_attention_, mac_attentions
from carsam.methods.mac_math import MacError, score_error_terms, solve_ridge
from carsam.models.adapters import KEY_QUANTIZER, QUERY_QUANTIZER, QuantDecoderAttention, QuantEncoderAttention
from carsam.models.quantize import QuantConfig, quantize_
from carsam.quant.fp_reference import fp_references
from carsam.quant.quantizers import QuantizerBase, QuantMode, UniformQuantizer
from carsam.quant.state import quant_modes_set, set_quant_mode
from carsam.run_context import RunContext
from carsam.testbed.spec import build_testbed_from_checkpoint

E, HEADS = 16, 2  # decoder twins: internal dim 8 (downsample 2), head dim 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class HeadMix(QuantizerBase):
    """Test double: an operand 'quantizer' mixing the head dim by fixed matrices `(h, d, d)` (identity in FP
    mode), i.e. an operand error that a corrected projection can represent exactly."""

    def __init__(self, matrices: Tensor, transposed: bool) -> None:
        super().__init__(8)
        self.register_buffer("matrices", matrices)
        self.transposed = transposed

    @property
    def is_calibrated(self) -> bool:
        return True

    def forward(self, x: Tensor) -> Tensor:
        if self.mode is QuantMode.FP:
            return x
        t = x.mT if self.transposed else x  # (..., N, d)
        mixed = (t.reshape(-1, self.matrices.shape[0], *t.shape[-2:]) @ self.matrices).reshape(t.shape)
        return mixed.mT if self.transposed else mixed


class AddToWeight(QuantizerBase):
    """Test double: a weight 'quantizer' adding a fixed offset (identity in FP mode)."""

    def __init__(self, offset: Tensor) -> None:
        super().__init__(8)
        self.register_buffer("offset", offset)

    @property
    def is_calibrated(self) -> bool:
        return True

    def forward(self, x: Tensor) -> Tensor:
        return x if self.mode is QuantMode.FP else x + self.offset


def _mixing(heads: int, d: int, seed: int) -> Tensor:
    return torch.eye(d, dtype=torch.float64) + 0.4 * torch.randn(heads, d, d, generator=_gen(seed), dtype=torch.float64)


def _none(path: str) -> None:
    return None


def _decoder_twin(make_w=_none, make_a=_none, dim: int = E, heads: int = HEADS,
                  dtype: torch.dtype = torch.float64) -> QuantDecoderAttention:
    torch.manual_seed(0)
    attn = transformer.Attention(dim, num_heads=heads, downsample_rate=2).to(dtype)
    twin = QuantDecoderAttention.from_attention(attn, make_w, make_a)
    set_quant_mode(twin, QuantMode.QUANTIZED)
    return twin


def _run(module: torch.nn.Module, inputs: tuple[Tensor, ...], phase: str) -> None:
    module(*inputs)


def _decoder_samples(twin, n: int, batch: int = 2, nq: int = 12, nk: int = 20, dim: int = E, seed: int = 1,
                     dtype: torch.dtype = torch.float64, spread: float = 0.0) -> list:
    """`n` samples of (tokens, image, image): channel scales `exp(spread * N(0, 1))` shared by all tokens
    (SAM-like heterogeneous channels with `spread > 0`) and a per-channel offset on the image tokens."""
    gen = _gen(seed)
    scale = torch.exp(spread * torch.randn(dim, generator=gen, dtype=dtype))
    offset = torch.randn(dim, generator=gen, dtype=dtype)
    inputs = [(torch.randn(batch, nq, dim, generator=gen, dtype=dtype) * scale,
               torch.randn(batch, nk, dim, generator=gen, dtype=dtype) * scale + offset) for _ in range(n)]
    return [functools.partial(_run, twin, (q, k, k)) for q, k in inputs]


def _explicit_score_error(attn, samples: list) -> float:
    """`‖Ŝ − S‖/‖S‖` of the content scores `L̂ K̂ᵀ`, formed from `qk_matmul`'s quantized operands themselves (FP:
    original weights), for exactness checks below the ~1e-8 floor of the Gram-based meter. (The encoder's
    `qk_matmul` output also holds the relative-position term, which MAC does not fit.)"""
    def scores(mode: QuantMode | None) -> Tensor:
        lhs: list[Tensor] = []
        rhs: list[Tensor] = []
        handles = [attn.qk_matmul.lhs_quantizer.register_forward_hook(lambda m, a, o: lhs.append(o.detach().clone())),
                   attn.qk_matmul.rhs_quantizer.register_forward_hook(lambda m, a, o: rhs.append(o.detach().clone()))]
        with quant_modes_set(attn, mode), torch.no_grad():
            for sample in samples:
                sample("")
        for handle in handles:
            handle.remove()
        return torch.cat([(a @ b).flatten() for a, b in zip(lhs, rhs)])
    fp = scores(QuantMode.FP)  # quant_modes_set(FP) swaps the original weights in
    return float((scores(None) - fp).norm() / fp.norm())


def test_score_error_terms_match_the_explicit_scores():
    q, k, qh, kh = (torch.randn(2, 3, n, 4, generator=_gen(i), dtype=torch.float64) for i, n in enumerate((5, 7, 5, 7)))
    err, ref = score_error_terms(q, k, qh, kh)
    assert err == pytest.approx(float((qh @ kh.mT - q @ k.mT).square().sum()), rel=1e-10)
    assert ref == pytest.approx(float((q @ k.mT).square().sum()), rel=1e-10)


def test_query_correction_is_exact_when_the_key_error_is_representable():
    mix = HeadMix(_mixing(HEADS, 4, seed=2), transposed=True)  # K̂ = K M: Q* = Q M⁻ᵀ is a linear map of x_q
    twin = _decoder_twin(make_a=lambda p: mix if p == KEY_QUANTIZER else None)
    samples = _decoder_samples(twin, n=3)
    record = correct_attention_(twin, twin, samples, ("q",), 1.0, 0.0, "synthetic")["q"]
    assert record["score_error_before"] > 0.1 and record["score_error_after"] < 1e-7  # the meter's floor
    assert _explicit_score_error(twin, samples) < 1e-8


def test_value_correction_is_exact_when_the_value_error_is_representable():
    offset = 0.2 * torch.randn(E // 2, E, generator=_gen(3), dtype=torch.float64)
    twin = _decoder_twin(make_w=lambda p: AddToWeight(offset) if p == "v_proj.weight_quantizer" else None)
    weight = twin.v_proj.weight.detach().clone()
    record = correct_attention_(twin, twin, _decoder_samples(twin, n=3), ("v",), 1.0, 0.0, "s")["v"]
    assert record["output_error_before"] > 0.05
    assert record["output_error_after"] < 1e-8
    assert torch.allclose(twin.v_proj.weight, weight - offset, atol=1e-8)


def test_encoder_key_correction_is_exact_and_touches_only_the_key_rows():
    torch.manual_seed(0)
    attn = image_encoder.Attention(E, num_heads=HEADS, use_rel_pos=True, input_size=(4, 4)).double()
    torch.nn.init.normal_(attn.rel_pos_h, std=0.3)
    torch.nn.init.normal_(attn.rel_pos_w, std=0.3)
    mix = HeadMix(_mixing(HEADS, E // HEADS, seed=4), transposed=False)  # L̂ = L M on (B*h, N, d)
    twin = QuantEncoderAttention.from_attention(attn, _none, lambda p: mix if p == QUERY_QUANTIZER else None)
    set_quant_mode(twin, QuantMode.QUANTIZED)
    weight = twin.qkv.weight.detach().clone()
    gen = _gen(5)
    samples = [functools.partial(_run, twin, (torch.randn(2, 4, 4, E, generator=gen, dtype=torch.float64),))
               for _ in range(3)]
    record = correct_attention_(twin, twin, samples, ("k",), 1.0, 0.0, "encoder")["k"]
    assert record["score_error_before"] > 0.1 and record["score_error_after"] < 1e-7  # the meter's floor
    assert _explicit_score_error(twin, samples) < 1e-8
    assert torch.equal(twin.qkv.weight[:E], weight[:E]) and torch.equal(twin.qkv.weight[2 * E:], weight[2 * E:])
    assert not torch.equal(twin.qkv.weight[E:2 * E], weight[E:2 * E])


def _w4a4_twin() -> QuantDecoderAttention:
    twin = _decoder_twin(lambda p: UniformQuantizer(4, ch_axis=0, observer="minmax"), lambda p: UniformQuantizer(4),
                         dim=32, heads=4, dtype=torch.float32)
    set_quant_mode(twin, QuantMode.FP)
    return twin


@pytest.mark.parametrize("solver", ["target_queries", "sylvester"])
def test_corrections_reduce_the_w4a4_errors_on_held_out_data(solver):
    twin = _w4a4_twin()
    samples = _decoder_samples(twin, n=16, batch=4, nq=7, nk=64, dim=32, dtype=torch.float32, spread=1.0)
    fit, held_out = samples[:12], samples[12:]
    set_quant_mode(twin, QuantMode.CALIBRATE)
    with torch.no_grad():
        for sample in fit:
            sample("calibrate")
    set_quant_mode(twin, QuantMode.QUANTIZED)
    before = attention_errors(twin, twin, held_out)
    correct_attention_(twin, twin, fit, ("q", "k", "v"), 1.0, 0.01, "w4a4", solver=solver)
    after = attention_errors(twin, twin, held_out)  # FP reference: the original weights (fp_reference)
    assert after["score_error"] < 0.9 * before["score_error"]  # measured: 0.55 -> 0.48 (sylvester: 0.47)
    assert after["output_error"] < 0.9 * before["output_error"]  # measured: 0.41 -> 0.32


@pytest.mark.parametrize("solver", ["target_queries", "sylvester"])
def test_strength_zero_leaves_the_attention_bit_identical(solver):
    twin = _w4a4_twin()
    samples = _decoder_samples(twin, n=3, batch=2, nq=7, nk=64, dim=32, dtype=torch.float32)
    set_quant_mode(twin, QuantMode.CALIBRATE)
    with torch.no_grad():
        samples[0]("calibrate")
    set_quant_mode(twin, QuantMode.QUANTIZED)
    state = {k: v.clone() for k, v in twin.state_dict().items()}
    record = correct_attention_(twin, twin, samples, ("q", "k", "v"), 0.0, 0.01, "zero", solver=solver)
    assert not fp_references(twin) and all(r["dw_rel"] > 0 for r in record.values())
    for key, value in twin.state_dict().items():
        assert torch.equal(_bits(value), _bits(state[key])), key


def test_singular_system_without_damping_names_the_attention_and_mac_damping():
    twin = _decoder_twin()
    samples = _decoder_samples(twin, n=1, batch=1, nq=3)  # 3 query rows < E + 1 unknowns
    with pytest.raises(MacError, match=r"attention 'tiny', q projection.*mac\.damping > 0"):
        correct_attention_(twin, twin, samples, ("q",), 1.0, 0.0, "tiny")
    gram = torch.ones(3, 3, dtype=torch.float64)
    with pytest.raises(MacError, match=r"head 5 .*mac\.damping"):
        solve_ridge(gram, torch.ones(3, 2), 0.0, "attention 'a', v projection head 5")
    delta, lam = solve_ridge(gram, torch.ones(3, 2), 0.01, "damped")
    assert lam == pytest.approx(0.01) and torch.isfinite(delta).all()


# ---------------------------------------------------------------- the random testbed, end to end

@pytest.fixture(scope="module")
def quantized_testbed(random_testbed_checkpoint, calib2) -> Sam:
    """The random testbed, W4A4 (encoder and decoder), calibrated on `calib2`."""
    torch.manual_seed(0)
    sam = build_testbed_from_checkpoint(random_testbed_checkpoint)
    quantize_calibrate_(sam, calib2, RunConfig(quant=QuantConfig()), RunContext())
    return sam


def _decoder_output(sam: Sam) -> Tensor:
    image = torch.randn(1, 3, 128, 128, generator=_gen(3))
    boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0]])
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        return sam.mask_decoder(sam.image_encoder(image), sam.prompt_encoder.get_dense_pe(), sparse, dense,
                                multimask_output=False)[0]


def test_mac_targets_are_found_by_class_in_data_flow_order(quantized_testbed):
    t2i = list(mac_attentions(quantized_testbed, "token_to_image"))
    assert t2i == ["mask_decoder.transformer.layers.0.cross_attn_token_to_image",
                   "mask_decoder.transformer.layers.1.cross_attn_token_to_image",
                   "mask_decoder.transformer.final_attn_token_to_image"]
    assert len(mac_attentions(quantized_testbed, "decoder")) == 7
    everything = list(mac_attentions(quantized_testbed, "all"))
    assert len(everything) == 11 and everything[0].startswith("image_encoder.blocks.0")


def test_apply_mac_requires_a_calibrated_model(random_testbed_checkpoint, calib2):
    sam = quantize_(build_testbed_from_checkpoint(random_testbed_checkpoint), QuantConfig())
    with pytest.raises(MacError, match="QUANTIZED"):
        apply_mac_(sam, calib2, MacConfig(enabled=True))


def test_apply_mac_lowers_the_score_error_of_each_token_to_image_attention(quantized_testbed, calib2):
    sam = copy.deepcopy(quantized_testbed)
    record = apply_mac_(sam, calib2, MacConfig(enabled=True, variant="both"))
    json.dumps(record)
    assert list(record["attentions"]) == list(mac_attentions(sam, "token_to_image")) and fp_references(sam)
    for path, entry in record["attentions"].items():
        steps = entry["steps"]
        assert list(steps) == ["q", "k", "v"]
        assert steps["k"]["score_error_after"] < steps["q"]["score_error_before"], path
        assert steps["q"]["score_error_after"] == steps["k"]["score_error_before"]
        assert all(s["solve_seconds"] >= 0 and s["dw_rel"] > 0 for s in steps.values())
    with quant_modes_set(sam, QuantMode.FP):  # FP mode swaps the original weights in: the FP model exactly
        fp_after = _decoder_output(sam)
    with quant_modes_set(quantized_testbed, QuantMode.FP):
        assert torch.equal(fp_after, _decoder_output(quantized_testbed))


def _bits(t: Tensor) -> Tensor:
    """`t` as raw integers when it is float32 (so that -0.0 and 0.0 differ), else `t`."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def test_apply_mac_with_strength_zero_is_bit_identical(quantized_testbed, calib2):
    sam = copy.deepcopy(quantized_testbed)
    apply_mac_(sam, calib2, MacConfig(enabled=True, variant="qk", strength=0.0))
    original = quantized_testbed.state_dict()
    for key, value in sam.state_dict().items():
        assert torch.equal(_bits(value), _bits(original[key])), key


def test_fp_phase_runs_once_per_sample_and_gives_the_same_corrections():
    """The FP calls kept across an attention's steps (`FpCallMemo`) change no number: same weights and records
    as rerunning the FP phase in every pass, with one FP run per sample instead of one per pass."""
    results = {}
    for budget in (0, 1 << 30):
        mix = HeadMix(_mixing(HEADS, 4, seed=2), transposed=True)
        twin = _decoder_twin(make_a=lambda p: mix if p == KEY_QUANTIZER else None,
                             make_w=lambda p: AddToWeight(0.1 * torch.ones(E // 2, E, dtype=torch.float64))
                             if p == "v_proj.weight_quantizer" else None)
        phases: list[str] = []
        samples = [functools.partial(lambda s, phase: (phases.append(phase), s(phase)), s)
                   for s in _decoder_samples(twin, n=3)]
        record = correct_attention_(twin, twin, samples, ("q", "k", "v"), 0.7, 0.01, "memo", fp_memo_bytes=budget)
        results[budget] = (record, {k: v.clone() for k, v in twin.state_dict().items()}, phases.count("fp"))
    (plain, plain_state, plain_fp), (memo, memo_state, memo_fp) = results[0], results[1 << 30]
    assert (plain_fp, memo_fp) == (3 * 4, 3)  # 3 samples x (3 steps + the final measurement) vs once each
    strip = lambda r: {s: {k: v for k, v in rec.items() if k != "solve_seconds"} for s, rec in r.items()}  # noqa: E731
    assert strip(plain) == strip(memo)
    assert all(torch.equal(plain_state[k], memo_state[k]) for k in plain_state)


def test_sylvester_solution_satisfies_the_papers_equation():
    from carsam.methods.mac_math import solve_separable

    gen = _gen(11)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 30, 4, generator=gen, dtype=torch.float64)  # 2 heads, head dim 4
    gram_x, gram_k = x.T @ x, k.transpose(-1, -2) @ k / 3
    rhs = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)
    delta, lam = solve_separable(gram_x, rhs, gram_k, damping=0.05, where="t")
    a = lam * torch.linalg.inv(gram_x)  # the paper's A = λ (XᵀX)⁻¹, B = K̂ᵀK̂, C' = (XᵀX)⁻¹ C
    for h in range(2):
        sol = delta[:, 4 * h:4 * (h + 1)]
        c = torch.linalg.solve(gram_x, rhs[h])
        residual = a @ sol + sol @ gram_k[h] - c
        assert float(residual.norm() / c.norm()) < 1e-6
    assert lam == pytest.approx(0.05 * float(gram_x.diagonal().mean()) * float(gram_k.diagonal(dim1=1, dim2=2).mean()))


def _shared_key_samples(twin, n: int) -> list:
    """`n` samples whose boxes all see the same image (one key Gram): the case the Sylvester form is exact in."""
    gen = _gen(12)
    offset = torch.randn(E, generator=gen, dtype=torch.float64)
    image = torch.randn(1, 20, E, generator=gen, dtype=torch.float64) + offset
    return [functools.partial(_run, twin, (torch.randn(2, 12, E, generator=gen, dtype=torch.float64),
                                            image.expand(2, -1, -1), image.expand(2, -1, -1))) for _ in range(n)]


@pytest.mark.parametrize("solver", ["target_queries", "sylvester"])
def test_both_solvers_recover_a_representable_query_error(solver):
    mix = HeadMix(_mixing(HEADS, 4, seed=2), transposed=True)  # K̂ = K M: the queries can absorb it exactly
    twin = _decoder_twin(make_a=lambda p: mix if p == KEY_QUANTIZER else None)
    samples = _shared_key_samples(twin, n=3)
    record = correct_attention_(twin, twin, samples, ("q",), 1.0, 0.0, "synthetic", solver=solver)["q"]
    assert record["score_error_before"] > 0.1 and record["score_error_after"] < 1e-7
    assert _explicit_score_error(twin, samples) < 1e-8


def test_unknown_solver_is_refused():
    with pytest.raises(ValueError, match="mac.solver must be one of"):
        MacConfig(solver="kronecker")

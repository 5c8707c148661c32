"""MatMul-Aware Compensation (MAC): closed-form corrections of q/k/v_proj so that the quantized
attention MatMuls reproduce the FP ones (docs/methods.md, "CAR-SAM: our reading"; the algebra, its exactness and
shapes are in `carsam.methods.mac_math`).

FP quantities come from a pass with every quantizer in FP mode *and the original weights*
(`fp_weights`), quantized ones from a pass with the quantizers as they are (QUANTIZED); the two passes
see the same samples and are paired call by call. Per attention, the steps of `variant` (`qk`: q then
k; `pv`: v; `both`: q, k, v) each get fresh paired passes (the k step sees the corrected queries, the v
step the corrected probabilities), and a last pass measures the result. Attentions (`targets`) are
processed in data-flow order, encoder first, so later attentions see the earlier corrections.

Streaming: per image the FP pass keeps only the attention's operands (`N × d` per call); the quantized
pass folds each call into the normal equations as it happens; only `(E+1)²`-sized sums persist. The FP
operands of one attention are the same in all of its passes (the FP model never changes), so they are
computed in its first pass and kept for the others (`FpCallMemo`, up to `FP_MEMO_BYTES`: about 15 MiB
per image for a real-SAM token->image attention); a sample beyond the budget reruns its FP phase.
Decoder attentions reuse each image's FP and quantized image embeddings, which MAC on the decoder cannot
change: a per-call memo on CPU (`cache_embeddings`; 4 MiB per image and phase on real SAM, 256 x 64 x 64
float32).

Apply: `W ← W + strength·ΔW`, `b ← b + strength·Δb` (float weights); each changed Linear's *weight*
quantizer is re-calibrated from the new weight (`calibrate_weight` + `finalize_calibration`). Activation
ranges stay as calibrated: the corrections were solved against them. `strength == 0` changes nothing.

Encoder (`targets: all`): the scores add a relative-position term computed from the queries (the
quantized ones by default, `quant.rel_pos_query`; the unquantized ones with `fp`), so a query correction
would move it in a way the target-query fit does not model. MAC therefore corrects only `k` and `v` of
the encoder attentions (each exact for what it affects: the content scores `scale · Q Kᵀ` and `P̂ V`);
the encoder's score error is that of the content term, and its `q` step is recorded as skipped.

FP reference: MAC changes float weights, so each changed Parameter first keeps its original value
(`carsam.quant.fp_reference.remember_fp_`); every FP-mode pass (`quant_modes_set(model, QuantMode.FP)`:
MAC's own, reconstruction targets, diagnostics) swaps the originals in and so runs the FP model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from carsam.eval.inference import EmbeddingSource, ImageEmbedding, SamBoxPredictor, box_predictor
from carsam.methods.mac_math import (
    MacError,
    heads_to_rows,
    key_residual,
    pv_normal_terms,
    query_residual,
    score_error_terms,
    separable_terms,
    solve_ridge,
    solve_separable,
    with_ones,
)
from carsam.methods.ptq4sam import token_to_image_attentions
from carsam.models.adapters import LinearLayer, QuantDecoderAttention, QuantEncoderAttention
from carsam.models.quantize import DECODER_SCOPE, ENCODER_SCOPE
from carsam.quant.adaround import AdaRoundQuantizer
from carsam.quant.fp_reference import remember_fp_
from carsam.quant.modules import QuantLinear
from carsam.quant.quantizers import QuantMode, UniformQuantizer, iter_quantizers
from carsam.quant.state import eval_no_grad, quant_modes_set

if TYPE_CHECKING:
    from carsam.config import MacConfig
    from carsam.data.coco import CocoBoxPrompts

logger = logging.getLogger(__name__)

PHASES = ("fp", "quantized")
STEPS = {"qk": ("q", "k"), "pv": ("v",), "both": ("q", "k", "v")}  # per variant, the projections corrected
TARGETS = ("token_to_image", "decoder", "all")  # t2i attentions only / every decoder attention / + encoder
ORDERS = ("before", "after")  # relative to reconstruction
SOLVERS = ("target_queries", "sylvester")  # q/k steps: per-sample target operands + ridge, or the paper's form
ENCODER_Q_SKIPPED = "encoder: the relative-position term also reads the queries (see mac.py)"
Attention = QuantDecoderAttention | QuantEncoderAttention
Sample = Callable[[str], None]  # runs one calibration sample through the model in phase "fp" | "quantized"
FP_MEMO_BYTES = 2 << 30  # FP calls of one attention kept across its steps (real SAM: ~20 MiB per image)


# ---------------------------------------------------------------- weights: projections, backup, apply

@dataclasses.dataclass(frozen=True)
class Projection:
    """One of q/k/v of an attention: the Linear holding it and its weight rows (output features)."""

    name: str
    linear: LinearLayer
    rows: slice

    @property
    def has_bias(self) -> bool:
        return self.linear.bias is not None


def projection(attn: Attention, name: str) -> Projection:
    """`q`/`k`/`v` of a decoder twin (`{name}_proj`) or an encoder twin (a third of the fused `qkv`)."""
    if isinstance(attn, QuantEncoderAttention):
        third = attn.qkv.weight.shape[0] // 3
        index = "qkv".index(name)
        return Projection(name, attn.qkv, slice(index * third, (index + 1) * third))
    linear = getattr(attn, f"{name}_proj")
    return Projection(name, linear, slice(0, linear.weight.shape[0]))


def refresh_weight_range_(linear: nn.Module) -> None:
    """Re-calibrate the uniform weight quantizer of `linear` (if any) from its current weight."""
    quantizer = getattr(linear, "weight_quantizer", None)
    if isinstance(linear, QuantLinear) and isinstance(quantizer, UniformQuantizer):
        linear.calibrate_weight()
        quantizer.finalize_calibration()


def apply_correction_(proj: Projection, delta: Tensor, strength: float) -> float:
    """`W ← W + strength·ΔW`, `b ← b + strength·Δb` on `proj`'s rows, then refresh its weight range.

    `delta` `(E(+1), rows)` stacks `ΔWᵀ` and (with a bias) `Δbᵀ`. Returns `‖ΔW‖/‖W‖` of the solved
    correction. With `strength == 0` nothing is touched.
    """
    weight, bias = proj.linear.weight, proj.linear.bias
    dw = delta[:weight.shape[1]].T
    rel = float(dw.norm() / weight[proj.rows].detach().to(torch.float64).norm().clamp_min(1e-300))
    if strength == 0.0:
        return rel
    remember_fp_(proj.linear, "weight")  # FP-mode passes keep seeing the original projection
    remember_fp_(proj.linear, "bias")
    with torch.no_grad():
        weight[proj.rows] += (strength * dw).to(weight)
        if bias is not None:
            bias[proj.rows] += (strength * delta[weight.shape[1]]).to(bias)
    refresh_weight_range_(proj.linear)
    return rel


# ---------------------------------------------------------------- streaming capture of paired calls

def _per_head(t: Tensor, heads: int) -> Tensor:
    """A MatMul operand `(B, h, N, C)` (decoder) or `(B*h, N, C)` (encoder) as `(B, h, N, C)`, detached."""
    t = t.detach()
    return t if t.dim() == 4 else t.reshape(-1, heads, *t.shape[1:])


def _input_hook(linear: nn.Module, store: Callable[[Tensor], None]) -> Any:
    """Hook handing `store` what `linear` multiplies: its `input_quantizer`'s output, or its input."""
    if isinstance(linear, QuantLinear):
        return linear.input_quantizer.register_forward_hook(lambda m, args, out: store(out.detach()))
    return linear.register_forward_pre_hook(lambda m, args: store(args[0].detach()))


@dataclasses.dataclass
class ErrorMeter:
    """Running relative errors of the content scores (`qk_matmul`'s product of its quantized operands, without
    the encoder's relative-position term) and of `pv_matmul`'s output."""

    score_err: float = 0.0
    score_ref: float = 0.0
    out_err: float = 0.0
    out_ref: float = 0.0

    def add(self, fp: dict[str, Tensor], q: dict[str, Tensor]) -> None:
        err, ref = score_error_terms(fp["lhs"], fp["rhs"], q["lhs_q"], q["rhs_q"])
        self.score_err, self.score_ref = self.score_err + err, self.score_ref + ref
        self.out_err += float((q["out"].double() - fp["out"].double()).square().sum())
        self.out_ref += float(fp["out"].double().square().sum())

    def summary(self) -> dict[str, float]:
        rel = lambda e, r: math.sqrt(e / r) if r > 0 else 0.0  # noqa: E731
        return {"score_error": rel(self.score_err, self.score_ref), "output_error": rel(self.out_err, self.out_ref)}


@dataclasses.dataclass
class NormalEquations:
    """Running `Σ AᵀA` and `Σ AᵀR` (shapes set by the first `add`); for the Sylvester form also the summed
    key Gram `Σ K̂ᵀK̂` `(h, d, d)` and the number of samples `n` (`carsam.methods.mac_math.separable_terms`)."""

    gram: Tensor | None = None
    rhs: Tensor | None = None
    key_gram: Tensor | None = None
    samples: int = 0

    def add(self, gram: Tensor, rhs: Tensor, key_gram: Tensor | None = None, samples: int = 0) -> None:
        self.gram = gram if self.gram is None else self.gram + gram
        self.rhs = rhs if self.rhs is None else self.rhs + rhs
        if key_gram is not None:
            self.key_gram = key_gram if self.key_gram is None else self.key_gram + key_gram
        self.samples += samples


class StepCapture:
    """Hooks on one attention that pair its FP and quantized calls and feed one MAC step.

    FP phase: per call, the operands `lhs`, `rhs` (keys, `(B, h, N, d)`) and `out` are kept until the
    quantized phase of the same sample, whose calls are consumed one by one (paired by call index):
    the error meter always, and the normal equations of `proj` (None: measure only).
    """

    fp_calls: list[dict[str, Tensor]]
    call: dict[str, Tensor]

    def __init__(self, attn: Attention, proj: Projection | None, solver: str = "target_queries") -> None:
        if solver not in SOLVERS:
            raise MacError(f"MAC: mac.solver must be one of {SOLVERS}, got '{solver}'")
        self.attn, self.proj, self.heads, self.solver = attn, proj, attn.num_heads, solver
        self.phase, self.fp_calls, self.index, self.call = PHASES[0], [], 0, {}
        self.meter, self.system = ErrorMeter(), NormalEquations()
        self.handles = self._register()

    def _register(self) -> list[Any]:
        a, put = self.attn, self._put
        handles = [a.qk_matmul.register_forward_pre_hook(lambda m, args: put(lhs=args[0], rhs=args[1].mT)),
                   a.qk_matmul.lhs_quantizer.register_forward_hook(lambda m, args, out: put(lhs_q=out)),
                   a.qk_matmul.rhs_quantizer.register_forward_hook(lambda m, args, out: put(rhs_q=out.mT)),
                   a.pv_matmul.register_forward_hook(lambda m, args, out: self._finish(out))]
        if self.proj is not None:
            handles.append(_input_hook(self.proj.linear, lambda x: put(x=x.reshape(x.shape[0], -1, x.shape[-1]))))
        if self.proj is not None and self.proj.name == "v":
            handles.append(a.pv_matmul.lhs_quantizer.register_forward_hook(lambda m, args, out: put(probs_q=out)))
        return handles

    def _put(self, **tensors: Tensor) -> None:
        for name, t in tensors.items():
            self.call[name] = t.detach() if name == "x" else _per_head(t, self.heads)

    def begin(self, phase: str) -> None:
        """Start the `phase` pass of a sample (`fp` forgets the previous sample's calls)."""
        self.phase, self.index = phase, 0
        if phase == PHASES[0]:
            self.fp_calls = []

    def end_sample(self) -> None:
        """Check that both passes of the sample called the attention equally often."""
        if self.index != len(self.fp_calls):
            raise MacError(f"MAC: the FP pass called the attention {len(self.fp_calls)} times, the quantized "
                           f"pass {self.index}; the two passes must see the same inputs")

    def _finish(self, out: Tensor) -> None:
        self._put(out=out)
        call, self.call = self.call, {}
        if self.phase == PHASES[0]:
            self.fp_calls.append({k: call[k] for k in ("lhs", "rhs", "out")})
            return
        if self.index >= len(self.fp_calls):
            raise MacError("MAC: the quantized pass called the attention more often than the FP pass")
        fp, self.index = self.fp_calls[self.index], self.index + 1
        self.meter.add(fp, call)
        if self.proj is not None and self.solver == "sylvester" and self.proj.name != "v":
            self.system.add(*self._separable_terms(fp, call))
        elif self.proj is not None:
            self.system.add(*self._normal_terms(fp, call))

    def _separable_terms(self, fp: dict[str, Tensor], q: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, int]:
        """This call's contribution to the Sylvester system of the q or k step (`mac_math.separable_terms`)."""
        assert self.proj is not None  # `_finish` calls this only with a projection
        a = with_ones(q["x"], self.proj.has_bias)  # (B, N, F)
        if self.proj.name == "q":
            return separable_terms(a, fp["lhs"], fp["rhs"], q["lhs"], q["rhs_q"])
        return separable_terms(a, fp["rhs"], fp["lhs"], q["rhs"], q["lhs_q"])

    def _normal_terms(self, fp: dict[str, Tensor], q: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """This call's contribution to the step's normal equations (see `carsam.methods.mac_math`)."""
        assert self.proj is not None  # `_finish` calls this only with a projection
        a = with_ones(q["x"], self.proj.has_bias)  # (B, N, F)
        if self.proj.name == "v":
            return pv_normal_terms(q["probs_q"], a, fp["out"].double() - q["out"].double())
        if self.proj.name == "q":
            r = query_residual(fp["lhs"], fp["rhs"], q["lhs"], q["rhs_q"])
        else:
            r = key_residual(fp["lhs"], fp["rhs"], q["lhs_q"], q["rhs"])
        rows, a = heads_to_rows(r), a.reshape(-1, a.shape[-1])
        if rows.shape[0] != a.shape[0]:
            raise MacError(f"MAC: {a.shape[0]} input rows of {self.proj.name} do not match {rows.shape[0]} "
                           "operand rows")
        return a.T @ a, a.T @ rows

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ---------------------------------------------------------------- passes

@contextlib.contextmanager
def _phase(model: nn.Module, phase: str) -> Iterator[None]:
    """FP: every quantizer in FP mode and the original weights (`quant_modes_set`); quantized: the model as it is."""
    if phase == PHASES[0]:
        with quant_modes_set(model, QuantMode.FP):
            yield
    else:
        yield


class FpCallMemo:
    """The FP phase's calls of one attention, per sample, kept across the MAC steps of that attention.

    FP passes run the original weights whatever the corrections (`fp_weights`), so every step of an
    attention sees the same FP calls; the memo keeps each sample's (`lhs`, `rhs`, `out` per call) from
    the first pass and later passes skip the FP phase. Samples are kept, on the model's device, until
    `budget_bytes` (counted over the storages they hold) is reached; the rest run their FP phase each
    time (same numbers, more time).
    """

    calls: dict[int, list[dict[str, Tensor]]]

    def __init__(self, budget_bytes: int = FP_MEMO_BYTES) -> None:
        self.budget_bytes, self.nbytes, self.calls = budget_bytes, 0, {}

    def get(self, index: int) -> list[dict[str, Tensor]] | None:
        """The FP calls kept for sample `index`, or None."""
        return self.calls.get(index)

    def keep(self, index: int, calls: list[dict[str, Tensor]]) -> None:
        """Keep sample `index`'s FP calls if they fit the budget."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for call in calls for t in call.values()}
        size = sum(storages.values())  # what keeping them holds: operands may be views of a larger output
        if self.nbytes + size <= self.budget_bytes:
            self.calls[index], self.nbytes = calls, self.nbytes + size


def run_pairs(model: nn.Module, samples: Sequence[Sample], capture: StepCapture,
              fp_memo: FpCallMemo | None = None) -> None:
    """Run every sample twice (FP, then quantized) under no_grad and eval mode, feeding `capture`; the FP
    phase of a sample held by `fp_memo` is served from it instead (and a computed one offered to it)."""
    with eval_no_grad(model):
        for index, sample in enumerate(samples):
            capture.begin(PHASES[0])
            kept = fp_memo.get(index) if fp_memo is not None else None
            if kept is not None:
                capture.fp_calls = kept
            else:
                with _phase(model, PHASES[0]):
                    sample(PHASES[0])
                if fp_memo is not None:
                    fp_memo.keep(index, capture.fp_calls)
            capture.begin(PHASES[1])
            with _phase(model, PHASES[1]):
                sample(PHASES[1])
            capture.end_sample()


def _run_image(predictor: SamBoxPredictor, calib: CocoBoxPrompts, image_id: int, encoder_only: bool,
               embeddings: dict[tuple[int, str], ImageEmbedding] | None, phase: str) -> None:
    """One image as the protocol runs it (embed, decode all boxes), reusing the embedding memoised in
    `embeddings` under `(image_id, phase)` if any (and memoising a new one there, on CPU)."""
    embedding = embeddings.get((image_id, phase)) if embeddings is not None else None
    if embedding is None:
        embedding = predictor.embed_image(calib, image_id)
        if embeddings is not None:
            embeddings[(image_id, phase)] = embedding.to("cpu")
    if not encoder_only:
        predictor.predict(embedding, calib.prompts(image_id)[0])


def sam_samples(sam: nn.Module, calib: CocoBoxPrompts, encoder_only: bool,
                embeddings: dict[tuple[int, str], ImageEmbedding] | None = None,
                source: EmbeddingSource | None = None) -> list[Sample]:
    """One `Sample` per calibration image with prompts (`encoder_only`: stop after the encoder); `source`:
    where the predictor gets image embeddings (the run's embedding store; None: encode)."""
    predictor = box_predictor(sam, source=source)
    ids = [i for i in calib.image_ids if len(calib.prompts(i)[0])]
    if not ids:
        raise MacError("MAC: the calibration set has no image with a prompt box")
    return [functools.partial(_run_image, predictor, calib, i, encoder_only, embeddings) for i in ids]


# ---------------------------------------------------------------- driver

def attention_errors(attn: Attention, model: nn.Module, samples: Sequence[Sample]) -> dict[str, float]:
    """Relative score and pv-output errors of `attn` over `samples` (one paired pass, nothing changed)."""
    capture = StepCapture(attn, None)
    try:
        run_pairs(model, samples, capture)
    finally:
        capture.remove()
    return capture.meter.summary()


def _solve(capture: StepCapture, damping: float, where: str) -> tuple[Tensor, float | list[float]]:
    """The step's correction `(F, h*d)` and its λ (per head for v)."""
    gram, rhs = capture.system.gram, capture.system.rhs
    if gram is None or rhs is None:
        raise MacError(f"MAC: no calibration call reached {where}")
    assert capture.proj is not None  # `_step` solves only for a capture built with a projection
    if capture.proj.name != "v" and capture.solver == "sylvester":
        assert capture.system.key_gram is not None  # `_finish` accumulates it for the Sylvester form
        return solve_separable(gram, rhs, capture.system.key_gram / capture.system.samples, damping, where)
    if capture.proj.name != "v":
        return solve_ridge(gram, rhs, damping, where)
    solved = [solve_ridge(gram[h], rhs[h], damping, f"{where} head {h}") for h in range(gram.shape[0])]
    return torch.cat([delta for delta, _ in solved], dim=1), [lam for _, lam in solved]


def _step(attn: Attention, model: nn.Module, samples: Sequence[Sample], proj: Projection | None, strength: float,
          damping: float, name: str, fp_memo: FpCallMemo | None = None, solver: str = "target_queries"
          ) -> tuple[dict[str, float], dict[str, Any]]:
    """One paired pass measuring the current errors and, for `proj`, solving and applying its correction."""
    capture = StepCapture(attn, proj, solver)
    try:
        run_pairs(model, samples, capture, fp_memo)
    finally:
        capture.remove()
    errors = capture.meter.summary()
    if proj is None:
        return errors, {}
    start = time.perf_counter()
    delta, lam = _solve(capture, damping, f"attention '{name}', {proj.name} projection")
    seconds = time.perf_counter() - start
    dw_rel = apply_correction_(proj, delta, strength)
    return errors, {"solve_seconds": round(seconds, 6), "lambda": lam, "dw_rel": dw_rel}


def correct_attention_(attn: Attention, model: nn.Module, samples: Sequence[Sample], steps: Sequence[str],
                       strength: float, damping: float, name: str,
                       fp_memo_bytes: int = FP_MEMO_BYTES, solver: str = "target_queries") -> dict[str, Any]:
    """Apply the MAC `steps` (`q`, `k`, `v`, in order) to `attn`, each solved on fresh paired passes of
    `samples` through `model`; in place. The FP phase runs once per sample (`FpCallMemo`, up to
    `fp_memo_bytes`; 0 runs it in every pass). `solver`: how the q and k steps solve (`SOLVERS`; the v step
    is the same closed form for both). Returns per step its solve record and the errors before/after."""
    records: dict[str, dict[str, Any]] = {}
    previous = None
    fp_memo = FpCallMemo(fp_memo_bytes)
    for step in (*steps, None):
        proj = projection(attn, step) if step is not None else None
        errors, solved = _step(attn, model, samples, proj, strength, damping, name, fp_memo, solver)
        if previous is not None:
            records[previous].update({f"{k}_after": v for k, v in errors.items()})
        if step is not None:
            records[step] = {**solved, **{f"{k}_before": v for k, v in errors.items()}}
        previous = step
    return records


def steps_for(variant: str, encoder: bool) -> tuple[str, ...]:
    """The projections to correct, in order; the encoder has no `q` step (see the module docstring)."""
    steps = STEPS[variant]
    return tuple(s for s in steps if s != "q") if encoder else steps


def mac_attentions(sam: nn.Module, targets: str) -> dict[str, Attention]:
    """The quantized attentions of `targets` by path, in data-flow order (encoder blocks first)."""
    if targets == "token_to_image":
        found = dict(token_to_image_attentions(sam))
    else:
        found = {f"{DECODER_SCOPE}.{p}": m for p, m in sam.get_submodule(DECODER_SCOPE).named_modules()}
    found = {p: m for p, m in found.items() if isinstance(m, QuantDecoderAttention)}
    if targets == "all":
        encoder = {f"{ENCODER_SCOPE}.{p}": m for p, m in sam.get_submodule(ENCODER_SCOPE).named_modules()
                   if isinstance(m, QuantEncoderAttention)}
        found = {**encoder, **found}
    if not found:
        raise MacError(f"MAC: no quantized attention for mac.targets='{targets}'; quantize_ the model first")
    return found


def _not_ready(quantizer: Any) -> str | None:
    """Why `quantizer` is not ready for MAC (None when it is)."""
    if isinstance(quantizer, AdaRoundQuantizer):
        return "AdaRound not finalized"
    if quantizer.mode is not QuantMode.QUANTIZED:
        return f"mode={quantizer.mode.value}"
    return None if quantizer.is_calibrated else "uncalibrated"


def check_ready(sam: nn.Module) -> None:
    """Raise MacError unless every quantizer is calibrated, QUANTIZED and not an AdaRound quantizer."""
    quantizers = list(iter_quantizers(sam))
    if not quantizers:
        raise MacError("MAC needs a quantized, calibrated model: run quantize_ and calibrate_ first")
    bad = {path: why for path, q in quantizers if (why := _not_ready(q)) is not None}
    if bad:
        listed = ", ".join(f"'{p}': {why}" for p, why in list(bad.items())[:5])
        raise MacError(f"MAC needs every quantizer calibrated and QUANTIZED; {len(bad)} are not, e.g. {listed}")


def apply_mac_(sam: nn.Module, calib: CocoBoxPrompts, mac: MacConfig, *,
               cache_embeddings: bool = True, source: EmbeddingSource | None = None) -> dict[str, Any]:
    """MAC on the attentions of `mac.targets` of a quantized, calibrated `sam`, in place (module docstring).

    Runs whatever `mac.enabled` says (the pipeline decides whether to call it). Every changed Parameter
    keeps its original value as its FP reference (`carsam.quant.fp_reference`), as baked AdaRound weights
    do, so FP-mode passes before and after MAC run the FP model. Returns a JSON-serialisable record: the
    settings and, per attention path, per step, `solve_seconds`, `lambda` (per head for v), `dw_rel`
    (`‖ΔW‖/‖W‖` of the solved correction, before `strength`) and `score_error`/`output_error`
    `_before`/`_after` (relative, over the calibration set). `cache_embeddings`: memoise the decoder
    attentions' image embeddings per image and phase for this call (module docstring). `source`: see
    `sam_samples` (the run's `context.embeddings`).
    """
    check_ready(sam)
    embeddings: dict[tuple[int, str], ImageEmbedding] | None = None
    record: dict[str, Any] = {"variant": mac.variant, "strength": mac.strength, "damping": mac.damping,
                              "targets": mac.targets, "solver": mac.solver, "attentions": {}}
    start = time.perf_counter()
    for path, attn in mac_attentions(sam, mac.targets).items():
        encoder = isinstance(attn, QuantEncoderAttention)
        if not encoder and embeddings is None and cache_embeddings:
            embeddings = {}  # created after the encoder attentions: the encoder no longer changes
        samples = sam_samples(sam, calib, encoder, None if encoder else embeddings, source)
        began = time.perf_counter()
        steps = correct_attention_(attn, sam, samples, steps_for(mac.variant, encoder), mac.strength, mac.damping,
                                   path, solver=mac.solver)
        if encoder and "q" in STEPS[mac.variant]:
            steps = {"q": {"skipped": ENCODER_Q_SKIPPED}, **steps}
        record["attentions"][path] = {"kind": "encoder" if encoder else "decoder",
                                      "seconds": round(time.perf_counter() - began, 3), "steps": steps}
        logger.info("MAC %s: solve %s s, %.1f s in all", path,
                    {s: r.get("solve_seconds") for s, r in steps.items()}, time.perf_counter() - began)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


__all__ = ["FP_MEMO_BYTES", "SOLVERS", "FpCallMemo", "MacError", "Projection", "StepCapture", "apply_correction_",
           "apply_mac_",
           "attention_errors", "check_ready", "correct_attention_", "mac_attentions", "projection",
           "refresh_weight_range_", "run_pairs", "sam_samples", "steps_for"]

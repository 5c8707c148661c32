"""PTQ4SAM: QDrop block reconstruction + Bimodal Integration (BIG) + Adaptive Granularity Quantization (AGQ).

Order of `apply_ptq4sam` (every quantizer is in FP mode right after `quantize_`, so the first two steps
see the FP model):

1. `quantize_` per `config.quant`;
2. one FP pass over the calibration set (`collect_fp_statistics`) records what BIG and AGQ need: the
   `k_proj` output of each decoder token->image attention (both blocks' `cross_attn_token_to_image`
   and `final_attn_token_to_image`; subsampled to at most `MAX_KEY_ROWS` rows per call, strided, to
   bound memory on real SAM's 4096 image tokens per box) and, per attention whose softmax output is
   quantized, the error `sum ||Q_tau(P) V - P V||^2` of each candidate tau in {1, 2, 4} (FP P and V,
   summed call by call, which equals `search_tau` on the concatenated tensors without holding them).
   One pass serves both: BIG's sign folding leaves every FP score, hence P and V, bit-identical;
3. BIG (`fold_bimodal_keys_`): where the keys are bimodal (`carsam.methods.big.is_bimodal`), the
   majority signs are folded into `q_proj`/`k_proj`. Running BIG before `calibrate_` *is* the
   recalibration of the affected quantizers (the `q_proj`/`k_proj` weight quantizers and the
   `qk_matmul` operands are calibrated on the folded model; nothing else sees different data).
   AGQ (`adopt_searched_taus_`): each such softmax-probability quantizer (`pv_matmul.lhs_quantizer`)
   becomes a `LogQuantizer` with the same bit width, scale 1 (the bound of a softmax) and the tau of
   least error. The image-encoder attentions get it too when the encoder is quantized and
   `recon.agq_encoder` is on (the default, as PTQ4SAM's code does; a global encoder map of real SAM is
   4096x4096 per head, which makes the search costlier);
4. `calibrate_` (all ranges; the log quantizers have a fixed scale and need none);
5. QDrop reconstruction (`carsam.recon.driver`), which also resets QDrop everywhere.

`details["big"]` lists per attention its bimodality coefficient and folded channels;
`details["agq"]` per attention the chosen tau and the error of each candidate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from carsam.eval.inference import EmbeddingSource, box_predictor, protocol_pass
from carsam.methods.big import BIMODALITY_THRESHOLD, DecoderAttention, bimodality_coefficient, integrate_bimodal_
from carsam.methods.calibrate import calibrate_, calibration_counts
from carsam.methods.qdrop import qdrop_recipe
from carsam.methods.registry import Method, register
from carsam.models.adapters import ATTENTION_TWINS, AttentionTwin
from carsam.models.architecture import two_way_blocks
from carsam.models.finite import check_finite_
from carsam.models.quantize import DECODER_SCOPE, ENCODER_SCOPE, quantize_
from carsam.quant.logquant import TAUS, LogQuantizer, pv_error
from carsam.quant.quantizers import QuantizerBase, QuantMode
from carsam.quant.state import eval_no_grad, quant_modes_set
from carsam.recon.driver import reconstruct_model_

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from carsam.config import RunConfig
    from carsam.data.coco import CocoBoxPrompts
    from carsam.run_context import RunContext

logger = logging.getLogger(__name__)

MAX_KEY_ROWS = 8192  # BIG: key rows kept per k_proj call (strided subsample)
TOKEN_TO_IMAGE = ("cross_attn_token_to_image",)
FINAL_TOKEN_TO_IMAGE = "final_attn_token_to_image"


@contextlib.contextmanager
def _hooked(hooks: list[tuple[nn.Module, Any, bool]]) -> Iterator[None]:
    """Register `(module, fn, pre)` forward (pre-)hooks for the duration of the block."""
    handles = [m.register_forward_pre_hook(fn) if pre else m.register_forward_hook(fn) for m, fn, pre in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def fp_calibration_pass(sam: nn.Module, calib: CocoBoxPrompts, source: EmbeddingSource | None = None) -> None:
    """Run the FP model (every quantizer in FP mode, restored after) over `calib` the protocol way."""
    with eval_no_grad(sam), quant_modes_set(sam, QuantMode.FP):
        protocol_pass(box_predictor(sam, source=source), calib)


def token_to_image_attentions(sam: nn.Module) -> dict[str, DecoderAttention]:
    """The decoder's token->image attentions by path: each block's cross attention, then the final one."""
    scope = sam.get_submodule(DECODER_SCOPE)
    found = {f"{DECODER_SCOPE}.{path}.{name}": block.get_submodule(name) for path, block in scope.named_modules()
             if isinstance(block, two_way_blocks()) for name in TOKEN_TO_IMAGE}
    found[f"{DECODER_SCOPE}.{FINAL_TOKEN_TO_IMAGE}"] = scope.get_submodule(FINAL_TOKEN_TO_IMAGE)
    return found


def _strided_rows(x: Tensor, max_rows: int) -> Tensor:
    """`x` `(..., C)` as `(R, C)` rows, strided down to at most `max_rows` rows, on CPU."""
    rows = x.detach().reshape(-1, x.shape[-1])
    step = max(1, -(-rows.shape[0] // max_rows))
    return rows[::step].float().cpu()


def _key_recorder(rows: list[Tensor]) -> Any:
    return lambda module, args, output: rows.append(_strided_rows(output, MAX_KEY_ROWS))


def fold_bimodal_keys_(attentions: dict[str, DecoderAttention], keys: dict[str, Tensor],
                       threshold: float = BIMODALITY_THRESHOLD) -> dict[str, dict[str, Any]]:
    """BIG on each attention from its FP keys `(R, C)`, in place. Returns per attention path: the bimodality
    coefficient of its keys, whether signs were folded and how many channels were negated."""
    report = {}
    for path, attn in attentions.items():
        coefficient = bimodality_coefficient(keys[path])
        signs = integrate_bimodal_(attn, keys[path], threshold)
        report[path] = {"bimodality": round(coefficient, 4), "folded": signs is not None,
                        "negated_channels": int((signs < 0).sum()) if signs is not None else 0}
    logger.info("BIG: folded %d of %d token->image attentions", sum(r["folded"] for r in report.values()),
                len(report))
    return report


def integrate_bimodal_keys_(sam: nn.Module, calib: CocoBoxPrompts, threshold: float = BIMODALITY_THRESHOLD,
                            source: EmbeddingSource | None = None) -> dict[str, dict[str, Any]]:
    """BIG alone on every decoder token->image attention of `sam`: its own FP pass, then the folding."""
    attentions = token_to_image_attentions(sam)
    keys, _ = collect_fp_statistics(sam, calib, attentions, {}, source)
    return fold_bimodal_keys_(attentions, keys, threshold)


def softmax_attentions(sam: nn.Module, encoder: bool) -> dict[str, AttentionTwin]:
    """Quantized attentions whose softmax-probability quantizer AGQ replaces: the decoder's, and the
    encoder's if `encoder`. Attentions whose probabilities stay FP (`nn.Identity`) are left out."""
    scopes = [DECODER_SCOPE] + ([ENCODER_SCOPE] if encoder else [])
    found: dict[str, AttentionTwin] = {}
    for scope in scopes:
        for path, module in sam.get_submodule(scope).named_modules():
            if isinstance(module, ATTENTION_TWINS) and \
                    isinstance(module.pv_matmul.lhs_quantizer, QuantizerBase):
                found[f"{scope}.{path}"] = module
    return found


class _PVErrors:
    """Running `sum ||Q_tau(P) V - P V||^2` per tau over the calls of one `pv_matmul` (a pre-hook)."""

    def __init__(self, bits: int, taus: tuple[int, ...] = TAUS) -> None:
        self.bits, self.errors = bits, {tau: 0.0 for tau in taus}

    def __call__(self, module: nn.Module, args: tuple[Tensor, Tensor]) -> None:
        probs, values = args
        for tau in self.errors:
            self.errors[tau] += float(pv_error(probs, values, self.bits, tau))

    def best(self) -> int:
        """The tau with the smallest summed error (ties: the earlier tau, as `search_tau`)."""
        return min(self.errors, key=self.errors.__getitem__)


def collect_fp_statistics(sam: nn.Module, calib: CocoBoxPrompts, big: dict[str, DecoderAttention],
                          agq: dict[str, AttentionTwin], source: EmbeddingSource | None = None
                          ) -> tuple[dict[str, Tensor], dict[str, _PVErrors]]:
    """One FP pass over `calib` (module docstring, step 2): the keys `(R, C)` of each attention of `big` and
    the tau errors of each attention of `agq`. No pass runs when both are empty."""
    rows: dict[str, list[Tensor]] = {path: [] for path in big}
    # `softmax_attentions` keeps only attentions whose probability quantizer is a QuantizerBase
    searches = {path: _PVErrors(cast(QuantizerBase, attn.pv_matmul.lhs_quantizer).bits) for path, attn in agq.items()}
    hooks = [(attn.k_proj, _key_recorder(rows[path]), False) for path, attn in big.items()]
    hooks += [(attn.pv_matmul, searches[path], True) for path, attn in agq.items()]
    if hooks:
        with _hooked(hooks):
            fp_calibration_pass(sam, calib, source)
    return {path: torch.cat(r) for path, r in rows.items()}, searches


def adopt_searched_taus_(attentions: dict[str, AttentionTwin],
                         searches: dict[str, _PVErrors]) -> dict[str, dict[str, Any]]:
    """AGQ: replace `pv_matmul.lhs_quantizer` of each attention by a `LogQuantizer` (same bits, scale 1) with
    the tau of least error in `searches`; in place. Returns tau, bits and the errors per path."""
    report = {}
    for path, attn in attentions.items():
        search = searches[path]
        old = cast(QuantizerBase, attn.pv_matmul.lhs_quantizer)  # a QuantizerBase: see `softmax_attentions`
        log_q = LogQuantizer(old.bits, tau=search.best(), scale=1.0).to(next(attn.parameters()).device)
        log_q.mode = old.mode
        attn.pv_matmul.lhs_quantizer = log_q
        report[path] = {"tau": log_q.tau, "bits": log_q.bits, "errors": {str(t): e for t, e in search.errors.items()}}
    logger.info("AGQ: taus %s", {p: r["tau"] for p, r in report.items()})
    return report


def adopt_log_softmax_(sam: nn.Module, calib: CocoBoxPrompts, encoder: bool = False,
                       source: EmbeddingSource | None = None) -> dict[str, dict[str, Any]]:
    """AGQ alone on `softmax_attentions(sam, encoder)`: its own FP pass, then the swap."""
    attentions = softmax_attentions(sam, encoder)
    _, searches = collect_fp_statistics(sam, calib, {}, attentions, source)
    return adopt_searched_taus_(attentions, searches)


def _prepare(sam: Sam, calib: CocoBoxPrompts, config: RunConfig, context: RunContext) -> dict[str, Any]:
    quantize_(sam, config.quant)
    big = token_to_image_attentions(sam) if config.quant.quantize_decoder else {}
    agq = softmax_attentions(sam, encoder=config.recon.agq_encoder and config.quant.quantize_encoder)
    keys, searches = collect_fp_statistics(sam, calib, big, agq, context.embeddings)
    details = {"big": fold_bimodal_keys_(big, keys), "agq": adopt_searched_taus_(agq, searches)}
    calibrate_(sam, calib, progress=context.progress, source=context.embeddings)
    check_finite_(sam, "PTQ4SAM's preparation (BIG, AGQ, calibration)")
    return {**calibration_counts(sam, calib), **details}


def rebuild_prepared_(sam: nn.Module, config: RunConfig, details: dict[str, Any]) -> None:
    """The module structure `prepare_ptq4sam_` leaves on the FP `sam`, from its `details`: `quantize_`, then
    each AGQ attention's log quantizer (bits and tau as recorded). Values come from a state dict after."""
    quantize_(sam, config.quant)
    device = next(sam.parameters()).device
    for path, chosen in details["agq"].items():
        attn = cast(AttentionTwin, sam.get_submodule(path))  # recorded from `softmax_attentions`
        attn.pv_matmul.lhs_quantizer = LogQuantizer(int(chosen["bits"]), tau=int(chosen["tau"]), scale=1.0).to(device)


def prepare_ptq4sam_(sam: Sam, calib: CocoBoxPrompts, config: RunConfig, context: RunContext) -> dict[str, Any]:
    """Steps 1-4 of the module docstring (quantize, BIG, AGQ, calibrate): PTQ4SAM before reconstruction.

    Returns the details `big`, `agq`, `num_quantizers` and `calib_images`. CAR-SAM starts from here too.
    With the run's prepared-model store (`context.prepared`, `carsam.cache.prepared`), a preparation
    already done with the same model, `config.quant`, `recon.agq_encoder`, calibration set, code and RNG
    state is restored from disk instead (bit-identical).
    """
    if context.prepared is None:
        return _prepare(sam, calib, config, context)
    fields = {"quant": dataclasses.asdict(config.quant), "agq_encoder": config.recon.agq_encoder}
    details, _ = context.prepared.prepare(sam, calib, "ptq4sam", fields, lambda: _prepare(sam, calib, config, context),
                                          lambda details: rebuild_prepared_(sam, config, details))
    return details


def apply_ptq4sam(sam: Sam, calib: CocoBoxPrompts, config: RunConfig, context: RunContext) -> dict[str, Any]:
    """PTQ4SAM: BIG and AGQ on the FP-mode quantized model, calibration, then QDrop reconstruction."""
    details = prepare_ptq4sam_(sam, calib, config, context)
    details["recon"] = reconstruct_model_(sam, calib, config.recon, qdrop_recipe(config), context=context)
    return details


register(Method("ptq4sam", apply_ptq4sam, trains=True,
                summary="PTQ4SAM: QDrop reconstruction + bimodal sign folding + log softmax quantizer (AGQ)"))

__all__ = ["adopt_log_softmax_", "adopt_searched_taus_", "apply_ptq4sam", "collect_fp_statistics",
           "fold_bimodal_keys_", "fp_calibration_pass", "integrate_bimodal_keys_",
           "prepare_ptq4sam_", "rebuild_prepared_", "softmax_attentions", "token_to_image_attentions"]

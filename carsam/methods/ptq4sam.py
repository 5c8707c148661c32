"""PTQ4SAM: QDrop block reconstruction + Bimodal Integration (BIG) + Adaptive Granularity Quantization (AGQ).

Order of `apply_ptq4sam` (every quantizer is in FP mode right after `quantize_`, so the first two steps
see the FP model):

1. `quantize_` per `config.quant`;
2. BIG (`integrate_bimodal_keys_`): one FP pass over the calibration set records the `k_proj` output
   of each decoder token->image attention (both blocks' `cross_attn_token_to_image` and
   `final_attn_token_to_image`); where it is bimodal (`carsam.methods.big.is_bimodal`), the majority
   signs are folded into `q_proj`/`k_proj`. Running BIG before `calibrate_` *is* the recalibration of
   the affected quantizers: the weight quantizers of `q_proj`/`k_proj` and the `qk_matmul` operands
   are calibrated on the folded model, and no other quantizer sees different data (folding leaves
   every score, hence everything downstream, unchanged). Keys are subsampled to at most
   `MAX_KEY_ROWS` rows per call (strided) to bound memory on real SAM (4096 image tokens per box).
3. AGQ (`adopt_log_softmax_`): each decoder attention's softmax-probability quantizer
   (`pv_matmul.lhs_quantizer`) becomes a `LogQuantizer` with the same bit width, scale 1 (the bound of
   a softmax) and the `tau` in {1, 2, 4} minimising the calibration error `sum ||Q(P) V - P V||^2`
   (FP P and V). The error is summed call by call, which equals `search_tau` on the concatenated
   calibration tensors without holding them. The image-encoder attentions get it too only with
   `recon.agq_encoder` (off by default: PTQ4SAM's technique is about the decoder's token->image maps,
   and a global encoder map of real SAM is 4096x4096 per head, costly to search);
4. `calibrate_` (all ranges; the log quantizers have a fixed scale and need none);
5. QDrop reconstruction (`carsam.methods.reconstruction`), which also resets QDrop everywhere.

`details["big"]` lists per attention its bimodality coefficient and folded channels;
`details["agq"]` per attention the chosen tau and the error of each candidate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from segment_anything.modeling import transformer
from torch import Tensor, nn

from carsam.eval.inference import SamBoxPredictor
from carsam.methods.big import BIMODALITY_THRESHOLD, bimodality_coefficient, integrate_bimodal_
from carsam.methods.calibrate import calibrate_
from carsam.methods.reconstruction import qdrop_recipe, reconstruct_model_
from carsam.methods.registry import Method, register
from carsam.models.adapters import QuantDecoderAttention, QuantEncoderAttention
from carsam.models.quantize import DECODER_SCOPE, ENCODER_SCOPE, quantize_
from carsam.prepared_cache import active_prepared_store
from carsam.quant.logquant import TAUS, LogQuantizer, pv_error
from carsam.quant.quantizers import QuantizerBase, QuantMode, iter_quantizers
from carsam.recon.cache import quant_modes_set

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from carsam.config import RunConfig
    from carsam.data.coco import CocoBoxPrompts

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


def fp_calibration_pass(sam: nn.Module, calib: CocoBoxPrompts) -> None:
    """Run the FP model (every quantizer in FP mode, restored after) over `calib`: embed, decode all boxes."""
    predictor, was_training = SamBoxPredictor(sam), sam.training
    sam.eval()
    try:
        with quant_modes_set(sam, QuantMode.FP), torch.no_grad():
            for image_id in calib.image_ids:
                boxes = calib.prompts(image_id)[0]
                if len(boxes):
                    predictor.predict(predictor.embed_image(calib, image_id), boxes)
    finally:
        sam.train(was_training)


def token_to_image_attentions(sam: nn.Module) -> dict[str, nn.Module]:
    """The decoder's token->image attentions by path: each block's cross attention, then the final one."""
    scope = sam.get_submodule(DECODER_SCOPE)
    found = {f"{DECODER_SCOPE}.{path}.{name}": block.get_submodule(name) for path, block in scope.named_modules()
             if isinstance(block, transformer.TwoWayAttentionBlock) for name in TOKEN_TO_IMAGE}
    found[f"{DECODER_SCOPE}.{FINAL_TOKEN_TO_IMAGE}"] = scope.get_submodule(FINAL_TOKEN_TO_IMAGE)
    return found


def _strided_rows(x: Tensor, max_rows: int) -> Tensor:
    """`x` `(..., C)` as `(R, C)` rows, strided down to at most `max_rows` rows, on CPU."""
    rows = x.detach().reshape(-1, x.shape[-1])
    step = max(1, -(-rows.shape[0] // max_rows))
    return rows[::step].float().cpu()


def collect_keys(sam: nn.Module, calib: CocoBoxPrompts, attentions: dict[str, nn.Module]) -> dict[str, Tensor]:
    """FP `k_proj` outputs of each attention over `calib`, as `(R, C)` rows (subsampled, see module doc)."""
    keys: dict[str, list[Tensor]] = {path: [] for path in attentions}

    def recorder(path: str) -> Any:
        return lambda module, args, output: keys[path].append(_strided_rows(output, MAX_KEY_ROWS))

    with _hooked([(attn.k_proj, recorder(path), False) for path, attn in attentions.items()]):
        fp_calibration_pass(sam, calib)
    return {path: torch.cat(rows) for path, rows in keys.items()}


def integrate_bimodal_keys_(sam: nn.Module, calib: CocoBoxPrompts,
                            threshold: float = BIMODALITY_THRESHOLD) -> dict[str, dict[str, Any]]:
    """BIG on every decoder token->image attention of `sam` (see the module docstring), in place.

    Returns per attention path: the bimodality coefficient of its FP keys, whether signs were folded
    and how many channels were negated.
    """
    attentions = token_to_image_attentions(sam)
    keys = collect_keys(sam, calib, attentions)
    report = {}
    for path, attn in attentions.items():
        coefficient = bimodality_coefficient(keys[path])
        signs = integrate_bimodal_(attn, keys[path], threshold)  # type: ignore[arg-type]
        report[path] = {"bimodality": round(coefficient, 4), "folded": signs is not None,
                        "negated_channels": int((signs < 0).sum()) if signs is not None else 0}
    logger.info("BIG: folded %d of %d token->image attentions", sum(r["folded"] for r in report.values()),
                len(report))
    return report


def softmax_attentions(sam: nn.Module, encoder: bool) -> dict[str, nn.Module]:
    """Quantized attentions whose softmax-probability quantizer AGQ replaces: the decoder's, and the
    encoder's if `encoder`. Attentions whose probabilities stay FP (`nn.Identity`) are left out."""
    scopes = [DECODER_SCOPE] + ([ENCODER_SCOPE] if encoder else [])
    found = {}
    for scope in scopes:
        for path, module in sam.get_submodule(scope).named_modules():
            if isinstance(module, (QuantDecoderAttention, QuantEncoderAttention)) and \
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


def adopt_log_softmax_(sam: nn.Module, calib: CocoBoxPrompts, encoder: bool = False) -> dict[str, dict[str, Any]]:
    """AGQ: replace `pv_matmul.lhs_quantizer` of each attention of `softmax_attentions(sam, encoder)` by
    a `LogQuantizer` (same bits, scale 1) with the searched tau; in place. Returns tau and errors per path."""
    attentions = softmax_attentions(sam, encoder)
    searches = {path: _PVErrors(attn.pv_matmul.lhs_quantizer.bits) for path, attn in attentions.items()}
    with _hooked([(attn.pv_matmul, searches[path], True) for path, attn in attentions.items()]):
        fp_calibration_pass(sam, calib)
    report = {}
    for path, attn in attentions.items():
        search = searches[path]
        old = attn.pv_matmul.lhs_quantizer
        log_q = LogQuantizer(old.bits, tau=search.best(), scale=1.0).to(next(attn.parameters()).device)
        log_q.mode = old.mode
        attn.pv_matmul.lhs_quantizer = log_q
        report[path] = {"tau": log_q.tau, "bits": log_q.bits, "errors": {str(t): e for t, e in search.errors.items()}}
    logger.info("AGQ: taus %s", {p: r["tau"] for p, r in report.items()})
    return report


def _prepare(sam: Sam, calib: CocoBoxPrompts, config: RunConfig) -> dict[str, Any]:
    quantize_(sam, config.quant)
    big = integrate_bimodal_keys_(sam, calib) if config.quant.quantize_decoder else {}
    agq = adopt_log_softmax_(sam, calib, encoder=config.recon.agq_encoder and config.quant.quantize_encoder)
    calibrate_(sam, calib)
    return {"num_quantizers": sum(1 for _ in iter_quantizers(sam)), "calib_images": len(calib), "big": big,
            "agq": agq}


def rebuild_prepared_(sam: nn.Module, config: RunConfig, details: dict[str, Any]) -> None:
    """The module structure `prepare_ptq4sam_` leaves on the FP `sam`, from its `details`: `quantize_`, then
    each AGQ attention's log quantizer (bits and tau as recorded). Values come from a state dict after."""
    quantize_(sam, config.quant)
    device = next(sam.parameters()).device
    for path, chosen in details["agq"].items():
        attn = sam.get_submodule(path)
        attn.pv_matmul.lhs_quantizer = LogQuantizer(int(chosen["bits"]), tau=int(chosen["tau"]), scale=1.0).to(device)


def prepare_ptq4sam_(sam: Sam, calib: CocoBoxPrompts, config: RunConfig) -> dict[str, Any]:
    """Steps 1-4 of the module docstring (quantize, BIG, AGQ, calibrate): PTQ4SAM before reconstruction.

    Returns the details `big`, `agq`, `num_quantizers` and `calib_images`. CAR-SAM starts from here too.
    Inside a run with the stage cache on (`carsam.prepared_cache`), a preparation already done with the
    same model, `config.quant`, `recon.agq_encoder`, calibration set, code and RNG state is restored
    from disk instead (bit-identical).
    """
    store = active_prepared_store()
    if store is None:
        return _prepare(sam, calib, config)
    fields = {"quant": dataclasses.asdict(config.quant), "agq_encoder": config.recon.agq_encoder}
    details, _ = store.prepare(sam, calib, "ptq4sam", fields, lambda: _prepare(sam, calib, config),
                               lambda details: rebuild_prepared_(sam, config, details))
    return details


def apply_ptq4sam(sam: Sam, calib: CocoBoxPrompts, config: RunConfig) -> dict[str, Any]:
    """PTQ4SAM: BIG and AGQ on the FP-mode quantized model, calibration, then QDrop reconstruction."""
    details = prepare_ptq4sam_(sam, calib, config)
    details["recon"] = reconstruct_model_(sam, calib, config.recon, qdrop_recipe(config))
    return details


register(Method("ptq4sam", apply_ptq4sam,
                summary="PTQ4SAM: QDrop reconstruction + bimodal sign folding + log softmax quantizer (AGQ)"))

__all__ = ["adopt_log_softmax_", "apply_ptq4sam", "collect_keys", "fp_calibration_pass", "integrate_bimodal_keys_",
           "prepare_ptq4sam_", "rebuild_prepared_", "softmax_attentions", "token_to_image_attentions"]

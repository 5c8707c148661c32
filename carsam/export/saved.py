"""Save a run's quantized model and load it back: `save_quantized(sam, run_dir, ...)` / `load_quantized(run_dir)`.

A saved model is two files in the run folder:

- `model.safetensors`: the model's whole `state_dict` (every Parameter as the method left it: MAC-corrected,
  BIG-folded, AdaRound-baked; every quantizer's `scale` / `zero_point`), fp32 as evaluated. safetensors holds
  tensors only, so loading it runs no code (weights-only by construction).
- `quantizers.json`: the manifest. The format, the model (type, the FP checkpoint and its SHA-256, the SAM
  structure's hash), the `quant` config the structure was built with, the run id and method, the SHA-256 of
  `model.safetensors`, and per quantizer (module path): its kind (`uniform` or `log`), bits, mode,
  `quant_prob` and, for `uniform`, symmetric / symmetric_scale / ch_axis / observer, for `log`, tau; and its
  qparams as lists (`scale`, and `zero_point` for `uniform`), so a reader sees them without torch.

Loading rebuilds the structure instead of unpickling it: the architecture of `model.type` (random init),
`quantize_` with the saved `quant` config, then the swaps a method makes (AGQ's `LogQuantizer` where the
manifest says `log`), then a strict `load_state_dict`. Every mismatch (another model type or testbed spec, a
file edited or truncated, a quantizer the structure lacks) is refused with one line (`SavedModelError`).
The loaded model is in eval mode with every quantizer as saved (QUANTIZED, `quant_prob` 1) and gives the run's
evaluation outputs bit for bit. It has no FP references (the original weights a method overwrote, which
FP-mode passes use); `attach_fp_references_` restores them from the FP checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from segment_anything.modeling import Sam
from torch import nn

from carsam.files import file_sha256, replace_atomic, write_text_atomic
from carsam.models.checkpoint import CheckpointError
from carsam.models.quantize import QuantConfig, quantize_
from carsam.models.sam import build_random_model
from carsam.quant.adaround import AdaRoundQuantizer
from carsam.quant.fp_reference import SUFFIX
from carsam.quant.logquant import LogQuantizer
from carsam.quant.quantizers import QuantizerBase, QuantMode, UniformQuantizer, iter_quantizers

MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "quantizers.json"
SAVED_FORMAT = 1  # bump when the files' layout or meaning changes
EXTRA_STATE = "_extra_state"  # state_dict key suffix of non-tensor module state (LogQuantizer's tau)


class SavedModelError(CheckpointError):
    """A saved quantized model is missing, unreadable, or does not fit the model its manifest names."""


def quantizer_entry(quantizer: QuantizerBase) -> dict[str, Any]:
    """The manifest entry of one quantizer: kind, bits, mode, quant_prob, its grid settings and qparams."""
    entry: dict[str, Any] = {"bits": quantizer.bits, "mode": quantizer.mode.value, "quant_prob": quantizer.quant_prob}
    if isinstance(quantizer, LogQuantizer):
        return {"kind": "log", **entry, "tau": quantizer.tau, "scale_from_data": quantizer.scale_from_data,
                "scale": quantizer.scale.detach().cpu().tolist()}
    if isinstance(quantizer, UniformQuantizer):
        return {"kind": "uniform", **entry, "symmetric": quantizer.symmetric,
                "symmetric_scale": quantizer.symmetric_scale, "ch_axis": quantizer.ch_axis,
                "observer": quantizer.observer_name, "learned_scale": isinstance(quantizer.scale, nn.Parameter),
                "scale": quantizer.scale.detach().cpu().tolist(),
                "zero_point": quantizer.zero_point.detach().cpu().tolist()}
    raise SavedModelError(f"quantizer of type {type(quantizer).__name__} cannot be saved: finalize it first "
                          "(an AdaRoundQuantizer is baked by finalize_adaround_)")


def structure_fingerprint(sam: nn.Module) -> str:
    """SHA-256 of the model's state entries (name, shape, dtype) outside the quantizers' qparams, whose shapes
    follow calibration: equal for two models of one architecture and quant structure."""
    quantizer_paths = {path for path, _ in iter_quantizers(sam)}
    digest = hashlib.sha256()
    for name, value in sam.state_dict().items():
        if not isinstance(value, torch.Tensor) or name.rsplit(".", 1)[0] in quantizer_paths:
            continue
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
    return digest.hexdigest()


def save_quantized(sam: nn.Module, run_dir: str | Path, model: Mapping[str, Any], quant: QuantConfig,
                   provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Write `run_dir/model.safetensors` and `run_dir/quantizers.json` (module docstring), each atomically.

    `model` is the record's model description (type, checkpoint, sha256); `quant` the config `quantize_` was
    called with; `provenance` (run id, method) goes into the manifest as is. Returns what the record keeps:
    the two file names, the weights file's size in bytes and SHA-256. Raises `SavedModelError` while an
    AdaRound quantizer is left unbaked.
    """
    run_dir = Path(run_dir)
    if any(isinstance(m, AdaRoundQuantizer) for m in sam.modules()):
        raise SavedModelError("the model still holds AdaRound quantizers: bake them (finalize_adaround_) first")
    quantizers = {path: quantizer_entry(q) for path, q in iter_quantizers(sam)}
    tensors = {name: value.detach().cpu().contiguous().clone() for name, value in sam.state_dict().items()
               if isinstance(value, torch.Tensor)}
    # serialized in memory, then written like every run file (save_file would create it readable by its owner only)
    payload = save(tensors, metadata={"format": str(SAVED_FORMAT), "model_type": str(model["type"])})
    replace_atomic(run_dir / MODEL_FILE, lambda tmp: tmp.write_bytes(payload))
    sha = file_sha256(run_dir / MODEL_FILE)
    manifest = {"format": SAVED_FORMAT, "model": dict(model), "structure_sha256": structure_fingerprint(sam),
                "quant": dataclasses.asdict(quant), **dict(provenance), "weights_file": MODEL_FILE,
                "weights_sha256": sha, "quantizers": quantizers}
    write_text_atomic(run_dir / MANIFEST_FILE, json.dumps(manifest, indent=1))
    return {"weights_file": MODEL_FILE, "manifest": MANIFEST_FILE, "bytes": (run_dir / MODEL_FILE).stat().st_size,
            "sha256": sha}


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The manifest of the model saved in `run_dir`; `SavedModelError` (one line) when absent or malformed."""
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        raise SavedModelError(f"no saved model in {run_dir} ({MANIFEST_FILE} missing): rerun the method with "
                              "output.save_model=true")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SavedModelError(f"{path} is not a JSON manifest ({err.__class__.__name__}); rerun the method") from err
    if not isinstance(manifest, dict) or manifest.get("format") != SAVED_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise SavedModelError(f"{path} has format {found!r}, this carsam reads format {SAVED_FORMAT}")
    return manifest


def _load_tensors(run_dir: Path, manifest: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    path = run_dir / str(manifest.get("weights_file", MODEL_FILE))
    if not path.is_file():
        raise SavedModelError(f"saved weights missing: {path} (the manifest names it); rerun the method")
    if file_sha256(path) != manifest.get("weights_sha256"):
        raise SavedModelError(f"{path} does not match its manifest's SHA-256 (changed or truncated); rerun the method")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise SavedModelError(f"{path} is not a readable safetensors file ({err}); rerun the method") from err


def _rebuild_structure(manifest: Mapping[str, Any]) -> Sam:
    """The architecture of the manifest's model type, with the quantizer structure the manifest describes."""
    from carsam.config import ConfigError, from_dict

    model_type = manifest["model"]["type"]
    try:
        sam = build_random_model(model_type)
        quant = from_dict(QuantConfig, manifest["quant"], prefix="quant.")
    except (ValueError, ConfigError, KeyError) as err:
        raise SavedModelError(f"the saved model's manifest names a model carsam cannot build: {err}") from err
    quantize_(sam, quant)
    entries: Mapping[str, Mapping[str, Any]] = manifest["quantizers"]
    for path, entry in entries.items():
        if entry.get("kind") == "log":  # AGQ replaced a softmax-probability quantizer
            parent_path, name = path.rsplit(".", 1)
            try:
                parent = sam.get_submodule(parent_path)
            except AttributeError as err:
                raise SavedModelError(f"the saved model has a quantizer at '{path}' that model type '{model_type}' "
                                      "lacks: the file belongs to another model") from err
            scale = None if entry["scale_from_data"] else 1.0
            setattr(parent, name, LogQuantizer(int(entry["bits"]), tau=int(entry["tau"]), scale=scale))
    built = {path for path, _ in iter_quantizers(sam)}
    if built != set(entries):
        extra, missing = sorted(set(entries) - built), sorted(built - set(entries))
        raise SavedModelError(f"the saved quantizers do not fit model type '{model_type}' with the saved quant config "
                              f"({len(extra)} saved but absent, {len(missing)} built but not saved, e.g. "
                              f"{(extra + missing)[0]})")
    return sam


def load_quantized(run_dir: str | Path, manifest: Mapping[str, Any] | None = None) -> Sam:
    """The quantized SAM saved in `run_dir`, ready to evaluate (eval mode, quantizers as saved; module docstring).

    Raises `SavedModelError` (one line saying what to fix) when the files are missing, corrupt, or of another
    model or testbed spec. `manifest`: the folder's manifest when the caller has read it already.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir) if manifest is None else manifest
    tensors = _load_tensors(run_dir, manifest)
    sam = _rebuild_structure(manifest)
    entries: Mapping[str, Mapping[str, Any]] = manifest["quantizers"]
    expected = sam.state_dict()
    for key in expected:
        if key.endswith(EXTRA_STATE):  # LogQuantizer's tau: from the manifest
            tensors[key] = {"tau": int(entries[key[: -len(EXTRA_STATE) - 1]]["tau"])}  # type: ignore[assignment]
    quantizer_paths = set(entries)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(tensors) if isinstance(expected[k], torch.Tensor)
                         and k.rsplit(".", 1)[0] not in quantizer_paths and expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong_shape:
        raise SavedModelError(f"{run_dir / MODEL_FILE} does not fit model type '{manifest['model']['type']}': "
                              f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} wrong-shape "
                              f"entries (e.g. {(missing + unexpected + wrong_shape)[0]}); it belongs to another "
                              "model or testbed spec")
    for path, quantizer in iter_quantizers(sam):
        entry = entries[path]
        if isinstance(quantizer, UniformQuantizer) and entry.get("learned_scale"):
            quantizer.set_qparams(tensors[f"{path}.scale"], tensors[f"{path}.zero_point"])
            quantizer.make_scale_learnable()
    sam.load_state_dict(tensors)
    if structure_fingerprint(sam) != manifest.get("structure_sha256"):
        raise SavedModelError(f"the model rebuilt for {run_dir} has another structure than the one saved (model type "
                              f"'{manifest['model']['type']}'): it was saved by another model or testbed spec")
    for path, quantizer in iter_quantizers(sam):
        quantizer.path = path
        quantizer.mode = QuantMode(entries[path]["mode"])
        quantizer.quant_prob = float(entries[path]["quant_prob"])
    return sam.eval()


def attach_fp_references_(sam: nn.Module, fp_state: Mapping[str, torch.Tensor]) -> int:
    """Give every Parameter of `sam` that differs from its value in `fp_state` (the FP checkpoint's state dict,
    keys as in `sam`) an FP reference (`carsam.quant.fp_reference`), so FP-mode passes of a loaded model run the
    FP model. Returns how many references were attached."""
    attached = 0
    for key, param in sam.named_parameters():
        module_path, _, name = key.rpartition(".")
        module = sam.get_submodule(module_path)
        if key not in fp_state or hasattr(module, name + SUFFIX):
            continue
        original = fp_state[key].to(param.device, param.dtype)
        if not torch.equal(original, param.detach()):
            module.register_buffer(name + SUFFIX, original.clone(), persistent=False)
            attached += 1
    return attached


__all__ = ["MANIFEST_FILE", "MODEL_FILE", "SavedModelError", "attach_fp_references_", "load_quantized",
           "read_manifest", "save_quantized"]

"""Helpers the tests import (plain functions and constants; the fixtures stay in conftest.py)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from carsam.config import JcarConfig, MacConfig
from carsam.diagnostics.maps import AttentionMaps
from carsam.diagnostics.oscillation import oscillation_frame
from carsam.diagnostics.writer import write_diagnostics
from carsam.record import RunRecord, write_record

BASE_CONFIG: dict[str, Any] = {
    "seed": 0, "model": {"type": "testbed"}, "data": {"synthetic_seed": 0, "prompt_source": "detector"},
    "quant": {"w_bits": 4, "a_bits": 4, "quantize_encoder": True, "a_observer": "mse"},
    "recon": {"iters": 500, "round_weight": 0.01},
    "mac": dataclasses.asdict(MacConfig()),  # the code defaults: CAR-SAM's main setting
    "jcar": dataclasses.asdict(JcarConfig()),
}


def make_run(runs_dir: Path, run_id: str, method: str, metrics: dict[str, float], *, bits: int = 4, seed: int = 0,
             data_seed: int = 0, status: str = "completed", error: str = "", total: float | None = 10.0,
             **config: dict[str, Any]) -> Path:
    """Write `runs_dir/run_id/record.json`; `config` sections (e.g. `mac={"enabled": True}`) update
    `BASE_CONFIG`'s. Returns the run folder."""
    cfg = copy.deepcopy(BASE_CONFIG)
    cfg.update(seed=seed, name=run_id, method=method)
    cfg["data"]["synthetic_seed"] = data_seed
    cfg["quant"].update(w_bits=bits, a_bits=bits)
    for section, values in config.items():
        cfg[section].update(values)
    record = RunRecord(run_id=run_id, name=run_id, method=method, model={"type": cfg["model"]["type"]},
                       w_bits=bits, a_bits=bits, prompts="detector", seed=seed, config=cfg, versions={},
                       git_commit="x", started_at="t", status=status, metrics=dict(metrics), error=error,
                       timings={} if total is None else {"total": total})
    write_record(runs_dir / run_id, record)
    return runs_dir / run_id


def metrics(mAP: float, mAP50: float = 0.6, mIoU: float = 0.7) -> dict[str, float]:
    return {"eval/mAP": mAP, "eval/mAP50": mAP50, "eval/mIoU": mIoU}


def attention_frame(entropy_q: float, mass_q: float) -> pd.DataFrame:
    """Entropy rows for the three decoder attentions (layers 0, 1; heads 0, 1) and token->image mask mass
    (layers 0, 1, 2); FP entropy 0.5 and mask mass 0.6 everywhere, the quantized values as given."""
    rows = []
    for module, layers in (("decoder.self_attn", (0, 1)), ("decoder.image_to_token", (0, 1)),
                           ("decoder.token_to_image", (0, 1, 2))):
        for layer in layers:
            for head in (0, 1):
                rows += [{"module": module, "layer": layer, "head": head, "kind": "entropy_fp", "value": 0.5},
                         {"module": module, "layer": layer, "head": head, "kind": "entropy_q", "value": entropy_q},
                         {"module": module, "layer": layer, "head": head, "kind": "entropy_gap",
                          "value": entropy_q - 0.5}]
                if module == "decoder.token_to_image":
                    rows += [{"module": module, "layer": layer, "head": head, "kind": "mask_mass_fp", "value": 0.6},
                             {"module": module, "layer": layer, "head": head, "kind": "mask_mass_q",
                              "value": mass_q}]
    return pd.DataFrame(rows)


def recon_frame() -> pd.DataFrame:
    """Two units' loss curves (queries and keys streams, plus a `round` curve that is not plotted)."""
    units = [{"unit": "layers.0", "curve": {"queries": [1.0, 0.5, 0.8, 0.2, 0.3, 0.1, 0.12],
                                            "keys": [2.0, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125],
                                            "round": [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2]}},
             {"unit": "layers.1", "curve": {"queries": [0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01]}}]
    return oscillation_frame(units, window=1)


def add_diagnostics(run_dir: Path, entropy_q: float = 0.7, mass_q: float = 0.4) -> Path:
    """Write a `diagnostics.parquet` with `attention_frame` and `recon_frame` rows into `run_dir`."""
    return write_diagnostics(run_dir, run_dir.name, [attention_frame(entropy_q, mass_q), recon_frame()])


def fake_attention_maps(shift: float, fp_seed: int = 0, prompts: int = 2, grid: int = 4) -> AttentionMaps:
    """Maps of `prompts` prompts (image 7, prompts 0, 1, ...) at 3 layers on a `grid` x `grid` token grid:
    FP maps drawn from `fp_seed` (so runs of one model share them), quantized = FP flattened towards uniform
    by `shift` in [0, 1]; 32 x 32 frames, box (4, 4, 20, 24)."""
    rng = np.random.default_rng(fp_seed)
    fp = rng.random((prompts, 3, grid, grid)) ** 4
    fp /= fp.sum(axis=(2, 3), keepdims=True)
    q = (1 - shift) * fp + shift / grid ** 2
    return AttentionMaps(fp=fp.astype(np.float32), q=q.astype(np.float32), layers=np.array([0, 1, 2]),
                         image_ids=np.full(prompts, 7), prompt_index=np.arange(prompts),
                         boxes=np.tile(np.array([[4, 4, 20, 24]], dtype=np.float32), (prompts, 1)),
                         images=rng.integers(0, 255, (prompts, 32, 32, 3), dtype=np.uint8))

"""`runs/<run_id>/diagnostics.parquet`: the run's diagnostics in one long table, and their summary numbers.

Columns (`COLUMNS`): run_id (str), module (str), layer (int64), head (int64), kind (str), step (int64),
value (float64). Attention rows come from `collect_attention_stats` (module `decoder.token_to_image`
etc., kinds `entropy_gap`, `kl`, `mask_mass_q`, ...; layer/head set, step 0); reconstruction rows
from `oscillation_frame` / `interference_frame` (module = unit or boundary, kinds
`"{quantity}/{stream}"`, layer = head = -1). `summary_metrics` condenses them into `diag/*` metrics
for `record.json`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from carsam.diagnostics.collector import (
    ENCODER_ATTN,
    ENTROPY_KINDS,
    IMAGE_TO_TOKEN,
    MASK_KINDS,
    SELF_ATTN,
    TOKEN_TO_IMAGE,
)
from carsam.diagnostics.oscillation import INTERFERENCE, NON_RECON_STREAMS, OSCILLATION, SIGN_CHANGES
from carsam.files import replace_atomic

DIAGNOSTICS_FILE = "diagnostics.parquet"
COLUMNS = ["run_id", "module", "layer", "head", "kind", "step", "value"]
DTYPES = {"run_id": "string", "module": "string", "layer": "int64", "head": "int64", "kind": "string",
          "step": "int64", "value": "float64"}
ATTENTION_SHORT = {TOKEN_TO_IMAGE: "t2i", IMAGE_TO_TOKEN: "i2t", SELF_ATTN: "self", ENCODER_ATTN: "encoder"}


def diagnostics_frame(run_id: str, frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate long-format frames (module, layer, head, kind, value; step optional, default 0) under
    `run_id`, with the columns and dtypes of `COLUMNS`/`DTYPES`. Raises ValueError on a missing column."""
    parts = [f if "step" in f else f.assign(step=0) for f in frames if len(f)]
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS[1:])
    missing = [c for c in COLUMNS[1:] if c not in df]
    if missing:
        raise ValueError(f"diagnostics frames lack column(s) {missing}; expected {COLUMNS[1:]}")
    df = df.assign(run_id=run_id)[COLUMNS]
    return df.astype(DTYPES).reset_index(drop=True)


def write_diagnostics_frame(run_dir: str | Path, df: pd.DataFrame) -> Path:
    """Write a `diagnostics_frame` table to `run_dir/diagnostics.parquet` atomically."""
    return replace_atomic(Path(run_dir) / DIAGNOSTICS_FILE, lambda tmp: df.to_parquet(tmp, engine="pyarrow",
                                                                                       index=False))


def write_diagnostics(run_dir: str | Path, run_id: str, frames: Iterable[pd.DataFrame]) -> Path:
    """Write `run_dir/diagnostics.parquet` atomically (`run_dir` = the run's folder, `runs/<run_id>`)."""
    return write_diagnostics_frame(run_dir, diagnostics_frame(run_id, frames))


def read_diagnostics(run_dir: str | Path) -> pd.DataFrame:
    """The diagnostics table of one run folder, with the dtypes of `DTYPES`."""
    return pd.read_parquet(Path(run_dir) / DIAGNOSTICS_FILE, engine="pyarrow").astype(DTYPES)


def head_means(df: pd.DataFrame) -> pd.DataFrame:
    """The attention rows of a diagnostics table (layer >= 0) averaged over heads: columns
    module, kind, layer, value."""
    rows = df[df["layer"] >= 0]
    return rows.groupby(["module", "kind", "layer"], as_index=False)["value"].mean()


def _mean(values: pd.Series) -> float | None:
    """Mean of the finite values, None if there is none."""
    finite = values[values.map(math.isfinite)]
    return float(finite.mean()) if len(finite) else None


def _attention_metrics(df: pd.DataFrame) -> dict[str, float | None]:
    """`diag/{kind}_{t2i|i2t|self|encoder}`: the mean over layers and heads of each attention kind."""
    rows = df[df["module"].isin(list(ATTENTION_SHORT)) & df["kind"].isin([*ENTROPY_KINDS, *MASK_KINDS])]
    return {f"diag/{kind}_{ATTENTION_SHORT[module]}": _mean(group["value"])
            for (module, kind), group in rows.groupby(["module", "kind"], sort=True)}


def _recon_metric(df: pd.DataFrame, quantity: str) -> float | None:
    """Mean of `quantity/{stream}` rows over units and reconstruction streams (not `round`, `total`)."""
    if df.empty:
        return None
    kinds = df["kind"].str.partition("/")
    chosen = (kinds[0] == quantity) & ~kinds[2].isin(list(NON_RECON_STREAMS))
    return _mean(df.loc[chosen, "value"])


def summary_metrics(df: pd.DataFrame) -> dict[str, float]:
    """`diag/*` summary numbers of a diagnostics table (one run), only those it has data for.

    Attention: `diag/{kind}_{attention}` for kinds `entropy_fp`, `entropy_q`, `entropy_gap`, `kl`,
    `mask_mass_fp`, `mask_mass_q`, `mask_mass_gap` and attentions `t2i` (both layers' and the final
    token->image attention), `i2t`, `self`, `encoder`, each the mean over layers and heads.
    Reconstruction: `diag/oscillation_index`, `diag/slope_sign_changes`, `diag/interference`, the
    mean over units (entries) and output streams of the per-unit values (finite ones only).
    """
    metrics = _attention_metrics(df)
    metrics.update({f"diag/{q}": _recon_metric(df, q) for q in (OSCILLATION, SIGN_CHANGES, INTERFERENCE)})
    return {name: value for name, value in sorted(metrics.items()) if value is not None}


__all__ = ["COLUMNS", "DIAGNOSTICS_FILE", "diagnostics_frame", "head_means", "read_diagnostics", "summary_metrics",
           "write_diagnostics", "write_diagnostics_frame"]

"""`carsam stats` output: the long statistics frame (`carsam.diagnostics.statistics`) as two summary tables
(decoder attentions, encoder blocks), a figure, and the files of one statistics folder.

Files of `OUT/`: `statistics.parquet` (long, every statistic), `statistics.md` (the summary tables),
`statistics.png` (token vs image input ranges of the decoder attentions; encoder outlier ratios per block)
and `statistics.json` (provenance: model, data, images, versions, commit, command; the summary rows).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from carsam.files import replace_atomic, write_text_atomic
from carsam.report.format import to_markdown

STATS_FILES = {"frame": "statistics.parquet", "tables": "statistics.md", "figure": "statistics.png",
               "record": "statistics.json"}
DECODER_COLUMNS = (  # (tensor, stat, column title)
    ("q_in", "min", "q_in min"), ("q_in", "max", "q_in max"), ("q_in", "absmax_rms", "q_in absmax/rms"),
    ("k_in", "min", "k_in min"), ("k_in", "max", "k_in max"), ("k_in", "absmax_rms", "k_in absmax/rms"),
    ("Q", "absmax_rms", "Q absmax/rms"), ("K", "absmax_rms", "K absmax/rms"), ("V", "absmax_rms", "V absmax/rms"),
    ("P", "below_4bit_step", "P < 1/15"), ("K", "bc_max", "K BC max"), ("K", "bimodal_channels", "K bimodal ch"),
)
ENCODER_COLUMNS = (
    ("norm1", "outlier_ratio", "norm1 outlier ratio"), ("norm2", "outlier_ratio", "norm2 outlier ratio"),
    ("gelu", "outlier_ratio", "GELU outlier ratio"), ("norm1", "outlier_channels", "norm1 outlier ch"),
    ("gelu", "outlier_channels", "GELU outlier ch"), ("gelu", "absmax", "GELU absmax"),
)


def _summary(frame: pd.DataFrame, scope: str, columns: tuple[tuple[str, str, str], ...]) -> pd.DataFrame:
    part = frame[frame["scope"] == scope]
    if part.empty:
        return pd.DataFrame()
    wide = part.pivot_table(index=["path", "module", "layer"], columns=["tensor", "stat"], values="value",
                            aggfunc="first", sort=False)
    table = pd.DataFrame({title: wide[(t, s)] for t, s, title in columns if (t, s) in wide.columns})
    return table.reset_index().drop(columns=["layer"]).rename(columns={"path": "site"})


def decoder_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per decoder attention (call order): input ranges, peak/rms ratios, P below a 4-bit step, BIG."""
    return _summary(frame, "decoder", DECODER_COLUMNS)


def encoder_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per encoder block: per-channel outlier ratios of the LayerNorm and post-GELU outputs."""
    return _summary(frame, "encoder", ENCODER_COLUMNS)


def statistics_markdown(frame: pd.DataFrame, title: str) -> str:
    """The two summary tables under `## title`."""
    parts = [f"## {title}\n"]
    for name, table in (("Decoder attentions", decoder_summary(frame)), ("Encoder blocks", encoder_summary(frame))):
        if not table.empty:
            parts.append(to_markdown(table, name, digits=3))
    return "\n".join(parts)


def plot_statistics(frame: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Left: each decoder attention's `q_in` and `k_in` ranges (bars from min to max); right: the encoder's
    per-block outlier ratios (LayerNorm and post-GELU outputs)."""
    fig = Figure(figsize=(12, 4.2))
    left, right = fig.subplots(1, 2)
    decoder = decoder_summary(frame)
    if not decoder.empty:
        x = range(len(decoder))
        for offset, name, color in ((-0.2, "q_in", "tab:blue"), (0.2, "k_in", "tab:orange")):
            low, high = decoder[f"{name} min"], decoder[f"{name} max"]
            left.bar([i + offset for i in x], high - low, bottom=low, width=0.38, color=color, label=name)
        left.set_xticks(list(x), [s.replace("mask_decoder.transformer.", "") for s in decoder["site"]],
                        rotation=60, ha="right", fontsize=7)
        left.axhline(0, color="black", lw=0.5)
        left.set_ylabel("value range (min to max)")
        left.legend(fontsize=8)
        left.set_title("decoder attention inputs", fontsize=9)
    encoder = encoder_summary(frame)
    if not encoder.empty:
        for column in ("norm1 outlier ratio", "norm2 outlier ratio", "GELU outlier ratio"):
            if column in encoder:
                right.plot(range(len(encoder)), encoder[column], marker="o", label=column)
        right.set_xticks(list(range(len(encoder))))
        right.set_xlabel("encoder block")
        right.set_ylabel("max channel absmax / median")
        right.set_yscale("log")
        right.legend(fontsize=8)
        right.set_title("encoder per-channel outliers", fontsize=9)
    fig.suptitle(title, fontsize=10)
    FigureCanvasAgg(fig)
    return replace_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def write_statistics(out: str | Path, frame: pd.DataFrame, provenance: Mapping[str, Any], title: str) -> list[Path]:
    """Write the four files of the module docstring into `out` (created); returns their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    frame_path = replace_atomic(folder / STATS_FILES["frame"], lambda tmp: frame.to_parquet(tmp, index=False))
    tables = write_text_atomic(folder / STATS_FILES["tables"], statistics_markdown(frame, title))
    figure = plot_statistics(frame, folder / STATS_FILES["figure"], title)
    summary = {"decoder": decoder_summary(frame).to_dict(orient="records"),
               "encoder": encoder_summary(frame).to_dict(orient="records")}
    record = write_text_atomic(folder / STATS_FILES["record"],
                               json.dumps({**provenance, "title": title, "summary": summary}, indent=1))
    return [frame_path, tables, figure, record]


__all__ = ["STATS_FILES", "decoder_summary", "encoder_summary", "plot_statistics", "statistics_markdown",
           "write_statistics"]

"""Paper figures (PNG) from the runs' `diagnostics.parquet` files (`carsam.diagnostics.writer`).

- `attention_entropy.png`: normalised attention entropy per decoder attention (self, token->image,
  image->token; one panel each) and layer, the mean over heads; FP (`entropy_fp`, averaged over the
  runs, black dashed) against each run's quantized model (`entropy_q`). On the token->image panel the
  last layer index (= decoder depth) is the final token->image attention.
- `mask_mass_t2i.png`: the token->image attention's mass inside the prompt's GT mask, FP
  (`mask_mass_fp`) against each run (`mask_mass_q`), per layer, mean over heads.
- `recon_loss_<run_id>.png`, one per run with curves: the reconstruction loss of each unit (one panel)
  and output stream (`loss/<stream>` rows; the `round`/`total` curves, which are not a reconstruction
  error, are left out), log y; the legend holds each curve's `oscillation_index/<stream>`.
- `attention_maps_<image id>_<prompt index>.png`, one per prompt kept in the runs' `attention_maps.npz`:
  the token->image attention maps, FP against each run (`carsam.report.attention_maps`).
Runs without a `diagnostics.parquet` (or without the rows a figure needs) are left out of it.
Figures are drawn on `matplotlib.figure.Figure` objects (Agg canvas), so pyplot's global state and
the process's backend are never touched.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from carsam.diagnostics.collector import IMAGE_TO_TOKEN, SELF_ATTN, TOKEN_TO_IMAGE
from carsam.diagnostics.maps import AttentionMaps
from carsam.diagnostics.oscillation import LOSS, NON_RECON_STREAMS, OSCILLATION
from carsam.diagnostics.writer import DIAGNOSTICS_FILE, head_means, read_diagnostics
from carsam.files import replace_atomic
from carsam.record import list_records
from carsam.report.attention_maps import load_attention_maps, write_map_figures

logger = logging.getLogger(__name__)

DECODER_ATTENTIONS = {SELF_ATTN: "self-attention", TOKEN_TO_IMAGE: "token -> image (last: final attn.)",
                      IMAGE_TO_TOKEN: "image -> token"}
DPI = 150


@dataclasses.dataclass
class FigureResult:
    """What `write_figures` did: the PNGs written, and the runs left out for lack of diagnostics."""

    written: list[Path] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)


def run_labels(records: Sequence[Mapping]) -> dict[str, str]:
    """run_id -> legend label: the run's name, with the run id's last 6 characters where names repeat."""
    names = [r.get("name") or r["run_id"] for r in records]
    return {r["run_id"]: n if names.count(n) == 1 else f"{n} ({r['run_id'][-6:]})" for r, n in zip(records, names)}


def load_diagnostics(runs_dir: str | Path, run_ids: Sequence[str] | None = None,
                     records: Sequence[Mapping] | None = None) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """({label: diagnostics frame} of the completed runs that have one, [labels of those that have none]).
    `run_ids` restricts the runs (default: every completed run); `records`: the runs' records when the
    caller has read them already (default: read from `runs_dir`)."""
    frames, skipped = {}, []
    for run_id, label in completed_labels(runs_dir, run_ids, records).items():
        run_dir = Path(runs_dir) / run_id
        if (run_dir / DIAGNOSTICS_FILE).is_file():
            frames[label] = read_diagnostics(run_dir)
        else:
            skipped.append(label)
    return frames, skipped


def layer_profile(diag: pd.DataFrame, module: str, kind: str) -> pd.Series:
    """The mean over heads of `kind` for `module`, indexed by layer (empty if the run has no such rows)."""
    means = head_means(diag)
    rows = means[(means["module"] == module) & (means["kind"] == kind)]
    return rows.set_index("layer")["value"].sort_index()


def _save(fig: Figure, path: Path) -> Path:
    """Render `fig` with the Agg canvas and write it to `path` atomically."""
    FigureCanvasAgg(fig)
    return replace_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))


def _fp_vs_runs(ax, diags: Mapping[str, pd.DataFrame], module: str, fp_kind: str, q_kind: str) -> bool:
    """Draw FP (mean over runs) and each run's profile of one module on `ax`; False if no run has data."""
    fp = [p for p in (layer_profile(d, module, fp_kind) for d in diags.values()) if len(p)]
    if not fp:
        return False
    mean_fp = pd.concat(fp, axis=1).mean(axis=1)
    ax.plot(mean_fp.index, mean_fp.values, "k--o", label="FP", linewidth=2)
    for label, diag in diags.items():
        q = layer_profile(diag, module, q_kind)
        if len(q):
            ax.plot(q.index, q.values, "-o", label=label, markersize=4)
    ax.set_xticks(sorted(mean_fp.index))
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)
    return True


def plot_attention_entropy(diags: Mapping[str, pd.DataFrame], path: str | Path) -> Path | None:
    """`attention_entropy.png` (module docstring); None when no run has entropy rows."""
    fig = Figure(figsize=(4.2 * len(DECODER_ATTENTIONS), 3.6))
    axes = fig.subplots(1, len(DECODER_ATTENTIONS), squeeze=False)[0]
    drawn = [_fp_vs_runs(ax, diags, module, "entropy_fp", "entropy_q") for ax, module in
             zip(axes, DECODER_ATTENTIONS)]
    if not any(drawn):
        return None
    for ax, title in zip(axes, DECODER_ATTENTIONS.values()):
        ax.set_title(title)
    axes[0].set_ylabel("normalised entropy")
    _legend(fig, axes)
    return _save(fig, Path(path))


def plot_mask_mass(diags: Mapping[str, pd.DataFrame], path: str | Path) -> Path | None:
    """`mask_mass_t2i.png` (module docstring); None when no run has mask-mass rows."""
    fig = Figure(figsize=(5.0, 3.6))
    ax = fig.subplots()
    if not _fp_vs_runs(ax, diags, TOKEN_TO_IMAGE, "mask_mass_fp", "mask_mass_q"):
        return None
    ax.set_title("token -> image: attention mass inside the GT mask")
    ax.set_ylabel("mask mass")
    _legend(fig, [ax])
    return _save(fig, Path(path))


def _legend(fig: Figure, axes: Sequence) -> None:
    """One legend for the figure, right of the panels (the labels of the panel with most lines)."""
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes), key=lambda hl: len(hl[1]))
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", frameon=False)
    fig.tight_layout()


def recon_curves(diag: pd.DataFrame) -> dict[str, dict[str, tuple[pd.DataFrame, float]]]:
    """{unit: {stream: (rows with step/value sorted by step, oscillation index or NaN)}} of the
    reconstruction streams' loss curves (not `round`/`total`)."""
    curves: dict[str, dict[str, tuple[pd.DataFrame, float]]] = {}
    if diag.empty:  # e.g. an FP run: nothing quantized, nothing reconstructed
        return curves
    kinds = diag["kind"].str.partition("/")
    loss = diag[(kinds[0] == LOSS) & ~kinds[2].isin(list(NON_RECON_STREAMS))]
    for (unit, kind), rows in loss.groupby(["module", "kind"], sort=False):
        stream = kind.partition("/")[2]
        index = diag.loc[(diag["module"] == unit) & (diag["kind"] == f"{OSCILLATION}/{stream}"), "value"]
        curves.setdefault(unit, {})[stream] = (rows.sort_values("step"), float(index.iloc[0]) if len(index)
                                               else math.nan)
    return curves


def plot_recon_loss(diag: pd.DataFrame, title: str, path: str | Path) -> Path | None:
    """`recon_loss_<run_id>.png` of one run (module docstring); None when it has no loss curves."""
    curves = recon_curves(diag)
    if not curves:
        return None
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (unit, streams) in zip(axes, curves.items()):
        for stream, (points, index) in streams.items():
            osc = "n/a" if math.isnan(index) else f"{index:.3f}"
            ax.plot(points["step"], points["value"], label=f"{stream} (osc {osc})")
        ax.set_yscale("log")
        ax.set_title(unit, fontsize="small")
        ax.set_xlabel("step")
        ax.legend(fontsize="x-small")
        ax.grid(alpha=0.3, which="both")
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: reconstruction loss per unit (legend: oscillation index)")
    fig.tight_layout()
    return _save(fig, Path(path))


def completed_labels(runs_dir: str | Path, run_ids: Sequence[str] | None = None,
                     records: Sequence[Mapping] | None = None) -> dict[str, str]:
    """run_id -> label (`run_labels`) of the completed runs (or those of `run_ids`) under `runs_dir`."""
    records = [r for r in (list_records(runs_dir) if records is None else records) if r.get("status") == "completed"
               and (run_ids is None or r["run_id"] in run_ids)]
    return run_labels(records)


def write_figures(runs_dir: str | Path, out_dir: str | Path, run_ids: Sequence[str] | None = None) -> FigureResult:
    """Write the module docstring's PNGs for the completed runs (or `run_ids`) to `out_dir`."""
    maps = load_attention_maps(runs_dir, completed_labels(runs_dir, run_ids))
    return figures_of(*load_diagnostics(runs_dir, run_ids), out_dir, maps)


def figures_of(diags: Mapping[str, pd.DataFrame], skipped: Sequence[str], out_dir: str | Path,
               maps: Mapping[str, AttentionMaps] | None = None) -> FigureResult:
    """`write_figures` on diagnostics already loaded (`load_diagnostics`): {label: frame}, labels without;
    `maps`: {label: attention maps} (`carsam.report.attention_maps.load_attention_maps`) for the map figures."""
    out = Path(out_dir)
    skipped = list(skipped)
    if skipped:
        logger.debug("no %s, left out of the figures: %s", DIAGNOSTICS_FILE, ", ".join(skipped))
    written = [plot_attention_entropy(diags, out / "attention_entropy.png"),
               plot_mask_mass(diags, out / "mask_mass_t2i.png")]
    for label, diag in diags.items():
        run_id = str(diag["run_id"].iloc[0]) if len(diag) else label
        written.append(plot_recon_loss(diag, label, out / f"recon_loss_{run_id}.png"))
    written += write_map_figures(maps or {}, out)
    return FigureResult(written=[p for p in written if p is not None], skipped=skipped)

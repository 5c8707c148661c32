"""Run records -> ablation tables (pandas) -> Markdown, LaTeX, CSV. Reads only `runs/*/record.json`
(and, for figures, `diagnostics.parquet`), never W&B.

Pipeline: `long_table` (one row per run and metric, `carsam.report.records`) -> `latest_runs` (a run
re-done with the same settings and seeds replaces the older record: the newest, i.e. the greatest
run id, which starts with the UTC start time, is kept) -> `ablation_tables`: four cell tables
(`carsam.report.format`), each cell the mean, sample std (ddof=1) and count of `eval/mAP`,
`eval/mAP50`, `eval/mIoU` over the completed runs that differ only in `seed` or `data_seed`:

- `method_bits`: rows method x encoder, columns W/A. Each method at its main setting: CAR-SAM with MAC
  and JCAR on at their defaults, every other method with both off.
- `mac_jcar`: CAR-SAM's components at their defaults (MAC off/on x JCAR off/on) and PTQ4SAM.
- `mac_readings`: CAR-SAM with every MAC reading (variant, strength, damping, targets, order) and off,
  JCAR off or at its default.
- `jcar_groupings`: CAR-SAM with every JCAR reading (grouping, weights, variance weighting) and off,
  MAC off or at its default.
Runs that differ from their method's usual settings in anything else carry it in the `other` row key;
`prompts` and `other` appear only where a table has more than one value of them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from carsam.files import write_text_atomic
from carsam.record import list_records
from carsam.report.format import CELL_COLUMNS, to_latex, to_markdown
from carsam.report.records import (
    COMPLETED,
    JCAR_DEFAULTS,
    MAC_DEFAULTS,
    NONE,
    TIME_METRIC,
    incomplete_runs,
    jcar_label,
    long_table,
    mac_label,
    records_long,
)

logger = logging.getLogger(__name__)

COLUMNS = ("run_id", "name", "method", "w_bits", "a_bits", "prompts", "seed", "status")
TABLE_METRICS = {"eval/mAP": "mAP", "eval/mAP50": "mAP50", "eval/mIoU": "mIoU", "eval/gt_box_mAP": "mAP (GT boxes)"}
IDENTITY = ("method", "w_bits", "a_bits", "prompts", "encoder", "mac", "jcar", "other", "seed", "data_seed")
METHOD_ORDER = ("fp", "box_as_mask", "rtn", "percentile", "omse", "brecq", "qdrop", "ptq4sam", "carsam")
ENCODER_ORDER = ("quantized", "FP")
OPTIONAL_KEYS = ("prompts", "other")
MAC_ON = mac_label({"mac": {**MAC_DEFAULTS, "enabled": True}})
JCAR_ON = jcar_label({"jcar": {**JCAR_DEFAULTS, "enabled": True}})
NOTE = ("Cells: mean over the completed runs that differ only in seed or data seed; several runs read "
        "`mean ± sample std (ddof=1) (n=runs)`. Bold: the best mean of each column within each encoder group "
        "(ties all bold).")


def runs_table(runs_dir: str | Path) -> pd.DataFrame:
    """One row per run: identity columns, every `eval/*` metric, and the total time in seconds."""
    return records_table(list_records(runs_dir))


def records_table(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """`runs_table` of records already read."""
    rows = []
    for rec in records:
        row = {k: rec.get(k) for k in COLUMNS}
        row.update({k: v for k, v in rec.get("metrics", {}).items()})
        row["seconds"] = rec.get("timings", {}).get("total")
        rows.append(row)
    return pd.DataFrame(rows)


def superseded_runs(long: pd.DataFrame) -> pd.DataFrame:
    """The completed runs replaced by a newer run with the same `IDENTITY` (settings and seeds):
    columns run_id, name, replaced_by."""
    runs = long[long["status"] == COMPLETED].drop_duplicates("run_id").sort_values("run_id")
    newest = runs.groupby(list(IDENTITY), sort=False)["run_id"].transform("last")
    old = runs[runs["run_id"] != newest]
    return pd.DataFrame({"run_id": old["run_id"], "name": old["name"],
                         "replaced_by": newest[old.index]}).reset_index(drop=True)


def latest_runs(long: pd.DataFrame) -> pd.DataFrame:
    """The rows of completed runs, without those of superseded runs (`superseded_runs`)."""
    done = long[long["status"] == COMPLETED]
    return done[~done["run_id"].isin(superseded_runs(long)["run_id"])].reset_index(drop=True)


def _rank(values: pd.Series, column: str) -> pd.Series:
    """Sort ranks of a row-key column: methods and encoders in their fixed order, "off"/"-" first, numbers
    numerically, then text."""
    fixed = {"method": METHOD_ORDER, "encoder": ENCODER_ORDER}.get(column, ())

    def key(v: str) -> tuple:
        if v in fixed:
            return (0, fixed.index(v), "")
        if v in ("off", NONE):
            return (1, 0.0, "")
        try:
            return (2, float(v), "")
        except ValueError:
            return (3, 0.0, v)
    order = {v: i for i, v in enumerate(sorted(set(values), key=key))}
    return values.map(order)


def aggregate(long: pd.DataFrame, rows: list[str]) -> pd.DataFrame:
    """A cell table: mean, sample std (ddof=1) and count of each `TABLE_METRICS` metric per `rows` x
    setting (`W<w>A<a>`), sorted by the rows' ranks. `prompts`/`other` are dropped from `rows` when they
    hold a single value."""
    df = long[long["metric"].isin(list(TABLE_METRICS))]
    rows = [r for r in rows if r not in OPTIONAL_KEYS or df[r].nunique() > 1]
    df = df.assign(setting="W" + df["w_bits"].astype(str) + "A" + df["a_bits"].astype(str),
                   metric=df["metric"].map(TABLE_METRICS), **{r: df[r].astype(str) for r in rows})
    cells = (df.groupby([*rows, "setting", "metric"], sort=False)["value"]
             .agg(mean="mean", std="std", n="count").reset_index())
    ranks = [_rank(cells[r], r) for r in rows] + [cells["metric"].map(list(TABLE_METRICS.values()).index)]
    order = pd.concat(ranks, axis=1, keys=range(len(ranks))).sort_values(list(range(len(ranks))), kind="stable")
    cells = cells.loc[order.index].reset_index(drop=True)
    return cells[[*rows, *CELL_COLUMNS]].astype({"n": "int64"})


def method_bits_table(long: pd.DataFrame) -> pd.DataFrame:
    """Rows method x encoder, columns W/A: each method at its main setting (see the module docstring)."""
    main = (long["method"] == "carsam") & (long["mac"] == MAC_ON) & (long["jcar"] == JCAR_ON)
    plain = (long["method"] != "carsam") & (long["mac"] == "off") & (long["jcar"] == "off")
    return aggregate(long[main | plain], ["encoder", "method", "prompts", "other"])


def mac_jcar_table(long: pd.DataFrame) -> pd.DataFrame:
    """CAR-SAM with MAC off/on x JCAR off/on at their defaults, and PTQ4SAM (both off), per encoder."""
    chosen = (long["method"].isin(["carsam", "ptq4sam"]) & long["mac"].isin(["off", MAC_ON])
              & long["jcar"].isin(["off", JCAR_ON]))
    df = long[chosen]
    df = df.assign(MAC=(df["mac"] != "off").map({True: "on", False: "off"}),
                   JCAR=(df["jcar"] != "off").map({True: "on", False: "off"}))
    return aggregate(df, ["encoder", "method", "prompts", "MAC", "JCAR", "other"])


def mac_readings_table(long: pd.DataFrame) -> pd.DataFrame:
    """CAR-SAM's MAC readings (and MAC off), with JCAR off or at its default."""
    df = long[(long["method"] == "carsam") & long["jcar"].isin(["off", JCAR_ON])]
    df = df.rename(columns={f"mac_{k}": k for k in ("variant", "strength", "damping", "targets", "order", "solver")})
    return aggregate(df, ["encoder", "prompts", "jcar", "variant", "strength", "damping", "targets", "order",
                          "solver", "other"])


def jcar_groupings_table(long: pd.DataFrame) -> pd.DataFrame:
    """CAR-SAM's JCAR readings (and JCAR off), with MAC off or at its default."""
    df = long[(long["method"] == "carsam") & long["mac"].isin(["off", MAC_ON])]
    df = df.rename(columns={"jcar_grouping": "grouping", "jcar_weights": "weights", "jcar_variance": "variance"})
    return aggregate(df, ["encoder", "prompts", "mac", "grouping", "weights", "variance", "other"])


def ablation_tables(long: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The four cell tables of the module docstring from a long table (superseded runs dropped)."""
    latest = latest_runs(long)
    return {"method_bits": method_bits_table(latest), "mac_jcar": mac_jcar_table(latest),
            "mac_readings": mac_readings_table(latest), "jcar_groupings": jcar_groupings_table(latest)}


def runs_summary(long: pd.DataFrame) -> pd.DataFrame:
    """One row per completed run: its settings, the table metrics and the total time."""
    done = long[long["status"] == COMPLETED]
    keys = ["name", "method", "w_bits", "a_bits", "encoder", "mac", "jcar", "other", "seed", "data_seed", "run_id"]
    wide = done.pivot_table(index=keys, columns="metric", values="value", aggfunc="first", sort=False)
    metrics = [m for m in (*TABLE_METRICS, TIME_METRIC) if m in wide.columns]
    return wide[metrics].reset_index().sort_values("run_id")[[*keys[:-1], *metrics, "run_id"]].reset_index(drop=True)


TITLES = {"method_bits": "Methods x bits (each method at its main setting)",
          "mac_jcar": "CAR-SAM components: MAC x JCAR, and PTQ4SAM",
          "mac_readings": "MAC readings (CAR-SAM)", "jcar_groupings": "JCAR readings (CAR-SAM)"}


def _csv(frame: pd.DataFrame, path: Path) -> Path:
    return write_text_atomic(path, frame.to_csv(index=False))


def _table_files(name: str, table: pd.DataFrame, out: Path) -> list[Path]:
    """`<name>.md`, `<name>.tex`, `<name>.csv` of one cell table."""
    return [write_text_atomic(out / f"{name}.md", to_markdown(table, TITLES.get(name, name))),
            write_text_atomic(out / f"{name}.tex", to_latex(table)), _csv(table, out / f"{name}.csv")]


def _summary_section(long: pd.DataFrame) -> str:
    """The completed runs, one line each, times in whole seconds."""
    summary = runs_summary(long)
    if TIME_METRIC in summary:
        summary[TIME_METRIC] = summary[TIME_METRIC].map(lambda v: "" if pd.isna(v) else f"{v:.0f}")
    return to_markdown(summary, "Completed runs", digits=4)


def _listing(title: str, frame: pd.DataFrame, path: Path, written: list[Path]) -> str:
    """A Markdown section (and CSV file) listing `frame`, or "" when it is empty."""
    if frame.empty:
        return ""
    written.append(_csv(frame, path))
    return to_markdown(frame, title)


def _diagnostics_sections(runs_dir: str | Path, records: Sequence[Mapping[str, Any]], out: Path,
                          written: list[Path]) -> list[str]:
    """The dissipation and oscillation tables (`carsam.report.attention`) and the figures
    (`carsam.report.figures`) of the runs that have diagnostics, each diagnostics file read once."""
    from carsam.report.attention import dissipation_table, oscillation_table  # matplotlib and the diagnostics
    from carsam.report.attention_maps import load_attention_maps
    from carsam.report.figures import completed_labels, figures_of, load_diagnostics  # readers, only on demand

    diags, skipped = load_diagnostics(runs_dir, records=records)
    maps = load_attention_maps(runs_dir, completed_labels(runs_dir, records=records))
    sections = []
    for name, title, table in (
            ("dissipation", "Attention dissipation per decoder attention (mean over heads; dH = entropy_q - "
                            "entropy_fp, normalised entropy; KL(P_fp || P_q) in nats; mask mass: token->image mass "
                            "inside the prompt's GT mask)", dissipation_table(diags)),
            ("oscillation", "Reconstruction oscillation per unit (mean over output streams)",
             oscillation_table(diags))):
        if table.empty:
            continue
        written.append(write_text_atomic(out / f"{name}.md", to_markdown(table, title, digits=4)))
        written.append(_csv(table, out / f"{name}.csv"))
        sections.append(to_markdown(table, title, digits=4))
    result = figures_of(diags, skipped, out / "figures", maps)
    written += result.written
    lines = [f"- `{p.relative_to(out)}`" for p in result.written] or ["- none (no run has diagnostics)"]
    if result.skipped:
        lines.append(f"- skipped, no diagnostics.parquet: {', '.join(result.skipped)}")
    sections.append("### Figures\n\n" + "\n".join(lines) + "\n")
    return sections


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None, figures: bool = False) -> list[Path]:
    """Write the report of every record under `runs_dir` into `out_dir` (default `<runs_dir>/report`):
    `report.md` (all sections: completed runs, the four ablation tables, superseded and incomplete runs,
    figures), each ablation table as `.md`/`.tex`/`.csv`, `runs.csv` (`runs_table`), `long.csv`
    (`long_table`), `superseded.csv`/`incomplete.csv` when there are any, and with `figures` the PNGs
    of `carsam.report.figures` under `figures/` with the dissipation and oscillation tables of
    `carsam.report.attention` (`dissipation.*`, `oscillation.*`). Returns the paths written, `report.md`
    last; nothing (an empty list) when there is no record."""
    records = list_records(runs_dir)
    if not records:
        return []
    out = Path(out_dir) if out_dir is not None else Path(runs_dir) / "report"
    long = records_long(records)
    written = [_csv(records_table(records), out / "runs.csv"), _csv(long, out / "long.csv")]
    done = long.loc[long["status"] == COMPLETED, "run_id"].nunique()
    sections = [f"# carsam report\n\n{len(records)} run records under `{runs_dir}`, {done} completed. {NOTE}\n",
                _summary_section(long)]
    for name, table in ablation_tables(long).items():
        if table.empty:
            sections.append(f"### {TITLES[name]}\n\nno runs\n")
            continue
        written += _table_files(name, table, out)
        sections.append(to_markdown(table, TITLES[name]))
    sections.append(_listing("Superseded runs (re-run with the same settings and seeds; the newest is used)",
                             superseded_runs(long), out / "superseded.csv", written))
    sections.append(_listing("Runs not completed (left out of the tables)", incomplete_runs(records),
                             out / "incomplete.csv", written))
    if figures:
        sections += _diagnostics_sections(runs_dir, records, out, written)
    written.append(write_text_atomic(out / "report.md", "\n".join(s for s in sections if s)))
    return written


__all__ = ["TABLE_METRICS", "TITLES", "ablation_tables", "aggregate", "jcar_groupings_table", "latest_runs",
           "long_table", "mac_jcar_table", "mac_readings_table", "method_bits_table", "records_table", "runs_summary",
           "runs_table", "superseded_runs", "write_report"]

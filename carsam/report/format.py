"""Tables -> Markdown and LaTeX (booktabs), with the best value per column marked.

A *cell table* is the tidy form `carsam.report.tables` builds: row-key columns, then `CELL_COLUMNS`
(`setting` e.g. "W4A4", `metric` e.g. "mAP", `mean`, `std` (sample std, ddof=1; NaN for one run), `n`).
It is shown pivoted: one line per row key, one column per (setting, metric). A cell reads `0.392` for a
single run and `0.410 ± 0.014 (n=2)` for several. The best mean of each column (rounded as shown; ties
all marked) is bold, compared within each group of rows that share the `encoder` column when the
table has one (a quantized-encoder row is not ranked against decoder-only rows). Any other frame is
shown as it is, floats rounded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable
from typing import cast

import pandas as pd

CELL_COLUMNS = ("setting", "metric", "mean", "std", "n")
BLOCK_COLUMN = "encoder"
_SETTING = re.compile(r"^W(\d+)A(\d+)$")
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def is_cell_table(table: pd.DataFrame) -> bool:
    """Whether `table` is a cell table (ends with `CELL_COLUMNS`)."""
    return tuple(table.columns[-len(CELL_COLUMNS):]) == CELL_COLUMNS


def row_keys(table: pd.DataFrame) -> list[str]:
    """The row-key columns of a cell table (all but `CELL_COLUMNS`)."""
    return [c for c in table.columns if c not in CELL_COLUMNS]


def setting_order(settings: Collection[str]) -> list[str]:
    """`W<w>A<a>` labels by bits, widest first; any other label after them, in the given order."""
    parsed = [(s, _SETTING.match(s)) for s in dict.fromkeys(settings)]
    matched = cast("Iterable[tuple[str, re.Match[str]]]", (m for m in parsed if m[1]))  # the filter drops None
    bits = sorted(matched, key=lambda m: (-int(m[1].group(1)), -int(m[1].group(2))))
    return [s for s, _ in bits] + [s for s, m in parsed if not m]


def cell_text(mean: float, std: float, n: int, digits: int = 3, pm: str = "±") -> str:
    """`0.392` (one run), `0.410 ± 0.014 (n=2)` (several), "" (no value)."""
    if mean is None or not math.isfinite(mean):
        return ""
    if n <= 1 or std is None or not math.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} {pm} {std:.{digits}f} (n={n})"


def best_flags(table: pd.DataFrame, digits: int = 3, lower_better: Collection[str] = ()) -> pd.Series:
    """True where a cell table's row holds the best mean of its column (setting, metric), rounded to
    `digits`, within its `encoder` group if the table has that column. Higher is better unless the
    metric is in `lower_better`."""
    sign = table["metric"].map(lambda m: -1.0 if m in lower_better else 1.0)
    score = (table["mean"].round(digits) * sign).astype("float64")
    groups = [c for c in (BLOCK_COLUMN,) if c in table.columns] + ["setting", "metric"]
    best = score.groupby([table[c] for c in groups]).transform("max")
    return (score == best) & score.notna()


def _pivot(table: pd.DataFrame, text: Callable[[pd.Series], str], bold: Callable[[str], str],
           digits: int) -> tuple[list[str], list[tuple[str, str]], list[list[str]]]:
    """(key columns, value columns as (setting, metric), rows of cell strings) of a cell table."""
    keys = row_keys(table)
    settings = setting_order(table["setting"].tolist())
    metrics = list(dict.fromkeys(table["metric"]))
    columns = [(s, m) for s in settings for m in metrics
               if ((table["setting"] == s) & (table["metric"] == m)).any()]
    flags = best_flags(table, digits)
    cells: dict[tuple, dict[tuple[str, str], str]] = {}
    for (_, row), flag in zip(table.iterrows(), flags):
        value = text(row)
        cells.setdefault(tuple(row[k] for k in keys), {})[(row["setting"], row["metric"])] = (
            bold(value) if flag and value else value)
    rows = [[str(k) for k in key] + [by_col.get(c, "") for c in columns] for key, by_col in cells.items()]
    return keys, columns, rows


def _plain(table: pd.DataFrame, digits: int) -> tuple[list[str], list[list[str]]]:
    """(header, rows of strings) of any frame: floats rounded to `digits`, NaN as ""."""
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.{digits}f}"
        return "" if v is None or v is pd.NA else str(v)
    return [str(c) for c in table.columns], [[fmt(v) for v in row] for row in table.itertuples(index=False)]


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def to_markdown(table: pd.DataFrame, title: str | None = None, digits: int = 3) -> str:
    """A GitHub Markdown table (cell tables pivoted, best per column in `**bold**`), under `### title`."""
    if is_cell_table(table):
        keys, columns, rows = _pivot(table, lambda r: cell_text(r["mean"], r["std"], int(r["n"]), digits),
                                     lambda s: f"**{s}**", digits)
        header = keys + [f"{s} {m}" for s, m in columns]
    else:
        header, rows = _plain(table, digits)
    lines = [_md_row(header), "|" + "|".join("---" for _ in header) + "|", *(_md_row(r) for r in rows)]
    return (f"### {title}\n\n" if title else "") + "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    """`text` with LaTeX's special characters escaped (`_` -> `\\_`, `%` -> `\\%`, ...)."""
    return "".join(_LATEX_SPECIAL.get(c, c) for c in str(text))


def _latex_cell_header(keys: list[str], columns: list[tuple[str, str]]) -> list[str]:
    """The two header lines of a pivoted cell table: settings over their metrics, with cmidrules."""
    spans: list[tuple[str, int]] = []
    for setting, _ in columns:
        spans = spans[:-1] + [(setting, spans[-1][1] + 1)] if spans and spans[-1][0] == setting else [
            *spans, (setting, 1)]
    top, rules, start = [""] * len(keys), [], len(keys) + 1
    for setting, width in spans:
        top.append(rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(setting)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
        start += width
    second = [latex_escape(k) for k in keys] + [latex_escape(m) for _, m in columns]
    return [" & ".join(top) + r" \\", " ".join(rules), " & ".join(second) + r" \\"]


def to_latex(table: pd.DataFrame, digits: int = 3) -> str:
    """A booktabs `tabular` (\\toprule, \\midrule, \\bottomrule; no float environment, so it can be
    `\\input` into a paper's own `table`). Cell tables are pivoted with the best per column in
    `\\textbf{}` and a \\midrule between encoder groups; every text is escaped."""
    if is_cell_table(table):
        keys, columns, rows = _pivot(
            table, lambda r: cell_text(r["mean"], r["std"], int(r["n"]), digits, pm=r"$\pm$"),
            lambda s: rf"\textbf{{{s}}}", digits)
        header = _latex_cell_header(keys, columns)
        body = [[latex_escape(c) for c in r[:len(keys)]] + r[len(keys):] for r in rows]
        align = "l" * len(keys) + "r" * len(columns)
        block = keys.index(BLOCK_COLUMN) if BLOCK_COLUMN in keys else None
        starts = {i for i in range(1, len(rows)) if block is not None and rows[i][block] != rows[i - 1][block]}
    else:
        names, plain = _plain(table, digits)
        header = [" & ".join(latex_escape(c) for c in names) + r" \\"]
        body = [[latex_escape(c) for c in r] for r in plain]
        align, starts = "l" * len(names), set()
    lines = [rf"\begin{{tabular}}{{{align}}}", r"\toprule", *header, r"\midrule"]
    for i, row in enumerate(body):
        lines += [r"\midrule"] * (i in starts) + [" & ".join(row) + r" \\"]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"

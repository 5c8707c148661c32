"""Diagnostics tables for the report: attention dissipation per decoder attention, and oscillation per unit.

Both read the frames of `carsam.report.figures.load_diagnostics` ({run label: diagnostics table}).

- `dissipation_table`: one row per decoder attention and layer (`t2i 0`, `t2i 1`, `t2i final`, ...),
  the mean over heads of the FP entropy (averaged over the runs: each run measures its own FP twin,
  which is the same model) and, per run, the quantized entropy gap (`entropy_q - entropy_fp`), the
  KL(P_fp || P_q), and for token->image attentions the FP and quantized mask mass.
- `oscillation_table`: one row per run and reconstruction unit: the oscillation index and slope sign
  changes (mean over the unit's reconstructed output streams), and the interference it caused.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from carsam.diagnostics.collector import IMAGE_TO_TOKEN, SELF_ATTN, TOKEN_TO_IMAGE
from carsam.diagnostics.oscillation import INTERFERENCE, NON_RECON_STREAMS, OSCILLATION, SIGN_CHANGES
from carsam.diagnostics.writer import ATTENTION_SHORT, head_means

DECODER_ATTENTIONS = (SELF_ATTN, TOKEN_TO_IMAGE, IMAGE_TO_TOKEN)  # call order within a layer


def _attention_label(module: str, layer: int, depth: int) -> str:
    """`t2i 0`, ..., and `t2i final` for the token->image attention after the last layer."""
    if module == TOKEN_TO_IMAGE and layer == depth:
        return "t2i final"
    return f"{ATTENTION_SHORT[module]} {layer}"


def _head_means(frame: pd.DataFrame) -> pd.DataFrame:
    """Decoder attention rows of one run: mean over heads, indexed by (module, layer), one column per kind."""
    means = head_means(frame)
    decoder = means[means["module"].isin(DECODER_ATTENTIONS)]
    return decoder.set_index(["module", "layer", "kind"])["value"].unstack("kind")


def dissipation_table(diags: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Rows: decoder attentions in call order; columns: `FP entropy`, then per run `<run> dH` (entropy gap),
    `<run> KL`, and for token->image `FP mask mass` and `<run> mask mass`. Empty if no run has attention rows."""
    means = {label: _head_means(frame) for label, frame in diags.items()}
    means = {label: m for label, m in means.items() if len(m)}
    if not means:
        return pd.DataFrame()
    index = sorted(set().union(*(m.index for m in means.values())),
                   key=lambda ml: (ml[1], DECODER_ATTENTIONS.index(ml[0])))
    depth = max(layer for module, layer in index if module == TOKEN_TO_IMAGE)
    labels = [_attention_label(module, layer, depth) for module, layer in index]
    table = pd.DataFrame(index=pd.Index(labels, name="attention"))

    def column(kind: str, label: str | None = None) -> list[float]:
        sources = [means[label]] if label else list(means.values())
        values = []
        for key in index:
            found = [m.loc[key, kind] for m in sources if key in m.index and kind in m.columns]
            values.append(sum(found) / len(found) if found else float("nan"))
        return values

    table["FP entropy"] = column("entropy_fp")
    table["FP mask mass"] = column("mask_mass_fp")
    for label in means:
        table[f"{label} dH"] = column("entropy_gap", label)
        table[f"{label} KL"] = column("kl", label)
        table[f"{label} mask mass"] = column("mask_mass_q", label)
    return table.reset_index()


def oscillation_table(diags: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Rows: run, unit (reconstruction order); columns: oscillation index, slope sign changes, interference
    (each the mean over the unit's reconstruction streams). Empty if no run has reconstruction rows."""
    rows = []
    for label, frame in diags.items():
        if frame.empty:
            continue
        quantity, _, stream = (frame["kind"].str.partition("/")[i] for i in (0, 1, 2))
        keep = ~stream.isin(list(NON_RECON_STREAMS))
        for unit in dict.fromkeys(frame.loc[(quantity == OSCILLATION) & keep, "module"]):
            of_unit = keep & (frame["module"] == unit)
            row = {"run": label, "unit": unit}
            for name, q in (("oscillation index", OSCILLATION), ("slope sign changes /100", SIGN_CHANGES),
                            ("interference", INTERFERENCE)):
                values = frame.loc[of_unit & (quantity == q), "value"]
                row[name] = float(values.mean()) if len(values) else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["dissipation_table", "oscillation_table"]

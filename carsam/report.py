"""Run records -> tables (pandas). Reads only `runs/*/record.json`, never W&B."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from carsam.runs import list_records

COLUMNS = ("run_id", "name", "method", "w_bits", "a_bits", "prompts", "seed", "status")


def runs_table(runs_dir: str | Path) -> pd.DataFrame:
    """One row per run: identity columns, every `eval/*` metric, and the total time in seconds."""
    rows = []
    for rec in list_records(runs_dir):
        row = {k: rec.get(k) for k in COLUMNS}
        row.update({k: v for k, v in rec.get("metrics", {}).items()})
        row["seconds"] = rec.get("timings", {}).get("total")
        rows.append(row)
    return pd.DataFrame(rows)

"""Print the dissipation table or the oscillation summary of chosen runs (the numbers in docs/results.md).

    python analysis/diagnostics_tables.py dissipation runs/<id-rtn> runs/<id-ptq4sam> runs/<id-carsam>
    python analysis/diagnostics_tables.py oscillation runs/<id> ...
    python analysis/diagnostics_tables.py boundaries runs/<id> ...

`dissipation`: `carsam.report.attention.dissipation_table` of the runs' `diagnostics.parquet` (labelled by run
name; the FP columns average the given runs only, so pass runs on the same data).
`oscillation`: per run, the mean over its decoder units and reconstruction streams of the oscillation index
and slope sign changes, recomputed from the loss curves in `record.json`
(`carsam.diagnostics.oscillation.oscillation_frame`, window 5), so it also covers runs recorded before
diagnostics were written; and the run's mAP.
`boundaries`: per run and decoder step, the queries / keys MSE of the quantized model at the end of the
reconstruction (the last entry of `details.recon.interference`): where the remaining error sits per stream.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from carsam.diagnostics.oscillation import NON_RECON_STREAMS, OSCILLATION, SIGN_CHANGES, oscillation_frame
from carsam.diagnostics.writer import read_diagnostics
from carsam.record import RECORD_FILE
from carsam.report.attention import dissipation_table


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / RECORD_FILE).read_text())


def dissipation(run_dirs: list[Path]) -> pd.DataFrame:
    """The dissipation table of the given run folders."""
    return dissipation_table({_record(d)["name"]: read_diagnostics(d) for d in run_dirs})


def oscillation(run_dirs: list[Path], window: int = 5) -> pd.DataFrame:
    """One row per run: decoder units, mean oscillation index and slope sign changes, mAP."""
    rows = []
    for run_dir in run_dirs:
        record = _record(run_dir)
        units = [u for u in record["details"]["recon"]["units"] if u["unit"].startswith("decoder")]
        frame = oscillation_frame(units, window)
        quantity, _, stream = (frame["kind"].str.partition("/")[i] for i in (0, 1, 2))
        recon = ~stream.isin(list(NON_RECON_STREAMS))
        rows.append({"run": record["name"], "units": len(units),
                     "oscillation index": frame.loc[recon & (quantity == OSCILLATION), "value"].mean(),
                     "slope sign changes /100": frame.loc[recon & (quantity == SIGN_CHANGES), "value"].mean(),
                     "mAP": record["metrics"]["eval/mAP"]})
    return pd.DataFrame(rows)


def boundaries(run_dirs: list[Path]) -> pd.DataFrame:
    """One row per run and decoder step: the final queries and keys MSE (`details.recon.interference`)."""
    rows = []
    for run_dir in run_dirs:
        record = _record(run_dir)
        final = record["details"]["recon"]["interference"][-1]["errors"]
        rows += [{"run": record["name"], "step": step, "queries": errors["queries"], "keys": errors["keys"]}
                 for step, errors in final.items()]
    return pd.DataFrame(rows)


TABLES = {"dissipation": dissipation, "oscillation": oscillation, "boundaries": boundaries}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in TABLES:
        print(__doc__, file=sys.stderr)
        return 2
    table = TABLES[argv[0]]([Path(a) for a in argv[1:]])
    print(table.round(4).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

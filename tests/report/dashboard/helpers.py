"""Helpers the tests import (plain functions and constants; the fixtures stay in conftest.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from carsam.diagnostics.maps import write_attention_maps
from carsam.diagnostics.writer import write_diagnostics
from carsam.record import RunRecord, write_record
from tests.report.helpers import fake_attention_maps

MODULES = ("decoder.self_attn", "decoder.token_to_image")


UNITS = ("decoder.layers.0", "decoder.layers.1")


STEPS = 30


def make_record(run_id: str, name: str, method: str, **metrics: float) -> RunRecord:
    """A finished record with `metrics` (keys given with '__' for '/': eval__mAP -> eval/mAP)."""
    return RunRecord(run_id=run_id, name=name, method=method, model={"type": "testbed"}, w_bits=4, a_bits=4,
                     prompts="detector", seed=0, config={"method": {"name": method}}, versions={}, git_commit="x",
                     started_at="t", status="completed", timings={"total": 12.5},
                     metrics={k.replace("__", "/"): v for k, v in metrics.items()})


def attention_frame(shift: float) -> pd.DataFrame:
    """entropy_fp/q/gap rows for 2 modules x 2 layers x 2 heads, mask_mass_* for token->image only."""
    rows = []
    for m, module in enumerate(MODULES):
        for layer in range(2):
            for head in range(2):
                fp = 0.4 + 0.1 * m + 0.05 * layer + 0.01 * head
                q = fp + shift * (1 + head)
                rows += [(module, layer, head, "entropy_fp", fp), (module, layer, head, "entropy_q", q),
                         (module, layer, head, "entropy_gap", q - fp)]
                if module == "decoder.token_to_image":
                    rows += [(module, layer, head, "mask_mass_fp", 0.6 - 0.1 * head),
                             (module, layer, head, "mask_mass_q", 0.6 - 0.1 * head - shift),
                             (module, layer, head, "mask_mass_gap", -shift)]
    return pd.DataFrame(rows, columns=["module", "layer", "head", "kind", "value"])


def recon_frame(wiggle: float) -> pd.DataFrame:
    """loss/out curves (STEPS points) and oscillation_index/out + interference/out rows for 2 units."""
    rows = []
    for u, unit in enumerate(UNITS):
        for t in range(STEPS):
            loss = 10 ** (-1 - u - t / 10) * (1 + wiggle * (-1) ** t)
            rows.append((unit, -1, -1, "loss/out", t, loss))
        rows.append((unit, -1, -1, "oscillation_index/out", 0, wiggle * (u + 1)))
        rows.append((unit, -1, -1, "interference/out", u + 1, 0.01 * u))
    return pd.DataFrame(rows, columns=["module", "layer", "head", "kind", "step", "value"])


def write_fake_runs(runs: Path) -> dict[str, RunRecord]:
    """Three runs under `runs`: two with diagnostics and attention maps, one without (whose name holds
    `</script>`)."""
    specs = [("r1", "rtn_w4a4", "rtn", 0.05, 0.3), ("r2", "carsam_w4a4", "carsam", 0.01, 0.05)]
    records = {}
    for run_id, name, method, shift, wiggle in specs:
        rec = make_record(run_id, name, method, eval__mAP=0.3 - shift, eval__mAP50=0.5, eval__mIoU=0.7,
                          diag__entropy_gap_t2i=shift, diag__oscillation_index=wiggle)
        write_record(runs / run_id, rec)
        write_diagnostics(runs / run_id, run_id, [attention_frame(shift), recon_frame(wiggle)])
        write_attention_maps(runs / run_id, fake_attention_maps(shift * 10))
        records[run_id] = rec
    plain = make_record("r3", "omse </script><b>bold</b>", "omse", eval__mAP=0.21)
    write_record(runs / "r3", plain)
    records["r3"] = plain
    assert not any(math.isnan(v) for r in records.values() for v in r.metrics.values())
    return records

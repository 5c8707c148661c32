"""The report's dissipation and oscillation tables: head means per decoder attention, the final token->image
attention named as such, FP averaged over runs, and per-unit oscillation means over reconstruction streams."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from carsam.report.attention import dissipation_table, oscillation_table


def _attention_rows(entropy_q: float, mask_q: float) -> list[dict]:
    rows = []
    for module, layer in (("decoder.self_attn", 0), ("decoder.token_to_image", 0), ("decoder.token_to_image", 1)):
        for head, offset in ((0, -0.1), (1, 0.1)):  # head mean = the value without offset
            rows += [{"module": module, "layer": layer, "head": head, "kind": "entropy_fp", "value": 0.4 + offset},
                     {"module": module, "layer": layer, "head": head, "kind": "entropy_gap",
                      "value": entropy_q - 0.4 + offset},
                     {"module": module, "layer": layer, "head": head, "kind": "kl", "value": 0.2}]
            if module == "decoder.token_to_image":
                rows += [{"module": module, "layer": layer, "head": head, "kind": "mask_mass_fp", "value": 0.3},
                         {"module": module, "layer": layer, "head": head, "kind": "mask_mass_q", "value": mask_q}]
    return rows


def test_dissipation_rows_are_head_means_in_call_order_with_the_final_attention_named():
    diags = {"rtn": pd.DataFrame(_attention_rows(0.5, 0.2)), "ptq": pd.DataFrame(_attention_rows(0.45, 0.28))}
    table = dissipation_table(diags)
    # layer 1 is the decoder depth here (the last token->image layer index): the final attention
    assert table["attention"].tolist() == ["self 0", "t2i 0", "t2i final"]
    assert table["FP entropy"].tolist() == pytest.approx([0.4] * 3)
    assert table["rtn dH"].tolist() == pytest.approx([0.1] * 3)
    assert table["ptq dH"].tolist() == pytest.approx([0.05] * 3)
    assert table["ptq mask mass"].tolist()[1:] == pytest.approx([0.28, 0.28])
    assert math.isnan(table["rtn mask mass"][0])  # self-attention has no mask mass


def test_oscillation_table_averages_the_reconstruction_streams_and_ignores_round_and_total():
    frame = pd.DataFrame([
        {"module": "u1", "layer": -1, "head": -1, "kind": "oscillation_index/queries", "step": 0, "value": 0.1},
        {"module": "u1", "layer": -1, "head": -1, "kind": "oscillation_index/keys", "step": 0, "value": 0.3},
        {"module": "u1", "layer": -1, "head": -1, "kind": "oscillation_index/total", "step": 0, "value": 9.0},
        {"module": "u1", "layer": -1, "head": -1, "kind": "interference/keys", "step": 1, "value": 0.01},
        {"module": "u2", "layer": -1, "head": -1, "kind": "oscillation_index/out", "step": 0, "value": 0.5},
    ])
    table = oscillation_table({"jcar": frame})
    assert table["unit"].tolist() == ["u1", "u2"]
    assert table["oscillation index"].tolist() == pytest.approx([0.2, 0.5])
    assert table["interference"][0] == pytest.approx(0.01) and math.isnan(table["interference"][1])


def test_runs_without_rows_give_empty_tables():
    empty = pd.DataFrame(columns=["module", "layer", "head", "kind", "step", "value"])
    assert dissipation_table({"fp": empty}).empty and oscillation_table({"fp": empty}).empty

"""Run records -> long table -> ablation tables: aggregation over seeds, selection, labels, formats."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest

from carsam.record import list_records
from carsam.report.format import best_flags, cell_text, latex_escape, to_latex, to_markdown
from carsam.report.records import JCAR_DEFAULTS, MAC_DEFAULTS, TIME_METRIC, incomplete_runs
from carsam.report.tables import (
    ablation_tables,
    latest_runs,
    long_table,
    runs_summary,
    runs_table,
    superseded_runs,
    write_report,
)

from .helpers import make_run, metrics

MAC_ON, JCAR_ON = {"enabled": True}, {"enabled": True}


@pytest.fixture()
def runs(tmp_path):
    """fp; ptq4sam on data seeds 0 and 1 (mAP 0.40, 0.42); carsam full / MAC only / JCAR only (each at the code
    defaults: MAC-QK, JCAR chain) / MAC-QK+PV / JCAR 10:1 weights; rtn; a failed rtn run."""
    root = tmp_path / "runs"
    make_run(root, "r01-fp", "fp", metrics(0.50), bits=32)
    make_run(root, "r02-ptq4sam", "ptq4sam", metrics(0.40, 0.60, 0.70))
    make_run(root, "r03-ptq4sam-seed1", "ptq4sam", metrics(0.42, 0.64, 0.70), data_seed=1)
    make_run(root, "r04-carsam", "carsam", metrics(0.45), mac=MAC_ON, jcar=JCAR_ON)
    make_run(root, "r05-carsam-mac", "carsam", metrics(0.43), mac=MAC_ON)
    make_run(root, "r06-carsam-jcar", "carsam", metrics(0.44), jcar=JCAR_ON)
    make_run(root, "r07-carsam-both", "carsam", metrics(0.46), mac={"enabled": True, "variant": "both"})
    make_run(root, "r08-carsam-tok10", "carsam", metrics(0.47), jcar={"enabled": True, "w_tokens": 10.0})
    make_run(root, "r09-rtn", "rtn", metrics(0.30))
    make_run(root, "r10-rtn-failed", "rtn", {}, status="failed", error="RuntimeError: out of memory", total=None)
    return root


def _cell(table: pd.DataFrame, metric: str = "mAP", **keys) -> pd.Series:
    rows = table[(table["metric"] == metric) & pd.concat([table[k] == v for k, v in keys.items()], axis=1).all(axis=1)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_long_table_has_one_row_per_run_and_metric_with_settings(runs):
    long = long_table(runs)
    done = long[long["status"] == "completed"]
    assert len(done) == 9 * 4  # 9 completed runs x (mAP, mAP50, mIoU, time/total_s)
    both = long[long["run_id"] == "r07-carsam-both"].iloc[0]
    assert (both["mac"], both["jcar"], both["encoder"], both["data_seed"]) == ("both@1", "off", "quantized", 0)
    assert long.loc[long["run_id"] == "r08-carsam-tok10", "jcar"].iloc[0] == "chain w=10:1"
    assert long.loc[long["run_id"] == "r01-fp", "encoder"].iloc[0] == "FP"
    assert set(long.loc[long["run_id"] == "r09-rtn", "metric"]) == {"eval/mAP", "eval/mAP50", "eval/mIoU", TIME_METRIC}


def test_cell_over_two_seeds_is_mean_and_sample_std(runs):
    table = ablation_tables(long_table(runs))["method_bits"]
    cell = _cell(table, method="ptq4sam", setting="W4A4")
    assert cell["mean"] == pytest.approx(0.41) and cell["std"] == pytest.approx(0.0141421, abs=1e-6)
    assert cell["n"] == 2
    assert cell_text(cell["mean"], cell["std"], cell["n"]) == "0.410 ± 0.014 (n=2)"
    single = _cell(table, method="rtn", setting="W4A4")
    assert single["n"] == 1 and math.isnan(single["std"]) and cell_text(0.3, math.nan, 1) == "0.300"
    assert "0.410 ± 0.014 (n=2)" in to_markdown(table)


def test_method_bits_keeps_each_method_at_its_main_setting(runs):
    table = ablation_tables(long_table(runs))["method_bits"]
    assert list(dict.fromkeys(table["method"])) == ["rtn", "ptq4sam", "carsam", "fp"]  # quantized block, then FP
    assert _cell(table, method="carsam")["mean"] == pytest.approx(0.45)  # MAC + JCAR on, not the ablations
    assert sorted(table["setting"].unique()) == ["W32A32", "W4A4"]


def test_mac_jcar_table_crosses_the_components_and_includes_ptq4sam(runs):
    table = ablation_tables(long_table(runs))["mac_jcar"]
    got = {(r.method, r.MAC, r.JCAR): r.mean for r in table[table["metric"] == "mAP"].itertuples()}
    assert got == pytest.approx({("ptq4sam", "off", "off"): 0.41, ("carsam", "on", "on"): 0.45,
                                 ("carsam", "on", "off"): 0.43, ("carsam", "off", "on"): 0.44})


def test_readings_tables_list_every_mac_variant_and_jcar_weighting(runs):
    tables = ablation_tables(long_table(runs))
    mac = tables["mac_readings"][lambda t: t["metric"] == "mAP"]
    assert {(r.variant, r.jcar): r.mean for r in mac.itertuples()} == pytest.approx(
        {("qk", "chain"): 0.45, ("qk", "off"): 0.43, ("both", "off"): 0.46, ("off", "chain"): 0.44})
    jcar = tables["jcar_groupings"][lambda t: t["metric"] == "mAP"]
    assert {(r.grouping, r.weights, r.mac): r.mean for r in jcar.itertuples()} == pytest.approx(
        {("chain", "1:1", "qk@1"): 0.45, ("off", "-", "qk@1"): 0.43, ("chain", "1:1", "off"): 0.44,
         ("chain", "10:1", "off"): 0.47})


def test_failed_runs_are_left_out_of_tables_and_listed_with_their_error(runs):
    long = long_table(runs)
    tables = ablation_tables(long)
    assert all("r10-rtn-failed" not in t.to_string() for t in tables.values())
    assert _cell(tables["method_bits"], method="rtn")["n"] == 1
    listed = incomplete_runs(list_records(runs))
    assert listed.to_dict("records") == [{"run_id": "r10-rtn-failed", "name": "r10-rtn-failed", "method": "rtn",
                                          "status": "failed", "error": "RuntimeError: out of memory"}]
    write_report(runs)
    assert "| r10-rtn-failed | r10-rtn-failed | rtn | failed | RuntimeError: out of memory |" in (
        runs / "report" / "report.md").read_text()


def test_rerun_with_same_settings_and_seeds_supersedes_the_older_record(runs):
    make_run(runs, "r11-rtn-again", "rtn", metrics(0.32))
    long = long_table(runs)
    assert superseded_runs(long).to_dict("records") == [{"run_id": "r09-rtn", "name": "r09-rtn",
                                                         "replaced_by": "r11-rtn-again"}]
    assert "r09-rtn" not in set(latest_runs(long)["run_id"])
    cell = _cell(ablation_tables(long)["method_bits"], method="rtn")
    assert (cell["mean"], cell["n"]) == (pytest.approx(0.32), 1)


def test_runs_with_another_setting_are_not_averaged_together(runs):
    make_run(runs, "r11-ptq4sam-rw", "ptq4sam", metrics(0.20), recon={"round_weight": 0.001})
    table = ablation_tables(long_table(runs))["method_bits"]
    assert _cell(table, method="ptq4sam", other="-")["mean"] == pytest.approx(0.41)
    assert _cell(table, method="ptq4sam", other="recon.round_weight=0.001")["mean"] == pytest.approx(0.20)


def test_runs_of_another_model_are_not_averaged_together(runs):
    """A SAM2-testbed run beside SAM v1 runs of the same cell stays apart; a v1 record written when the
    stability fallback still defaulted to true (for every model) is averaged with today's (null)."""
    make_run(runs, "r11-ptq4sam-sam2", "ptq4sam", metrics(0.30),
             model={"type": "sam2_testbed", "sam2_stability_fallback": False})
    make_run(runs, "r12-ptq4sam-old-v1", "ptq4sam", metrics(0.44), data_seed=2,
             model={"sam2_stability_fallback": True})
    table = ablation_tables(long_table(runs))["method_bits"]
    sam2 = _cell(table, method="ptq4sam", other="model.sam2_stability_fallback=False, model.type=sam2_testbed")
    assert (sam2["mean"], sam2["n"]) == (pytest.approx(0.30), 1)
    v1 = _cell(table, method="ptq4sam", other="-")
    assert (v1["mean"], v1["n"]) == (pytest.approx((0.40 + 0.42 + 0.44) / 3), 3)


def test_a_record_older_than_a_placement_field_is_not_averaged_with_its_new_default(runs):
    """Records written before `quant.rel_pos_query` and `recon.agq_encoder` existed ran with the FP-query
    rel-pos term and no encoder AGQ, which today's defaults are not: the cells stay apart."""
    make_run(runs, "r12-ptq4sam-new", "ptq4sam", metrics(0.50), quant={"rel_pos_query": "quantized"},
             recon={"agq_encoder": True})
    table = ablation_tables(long_table(runs))["method_bits"]
    new = _cell(table, method="ptq4sam", other="quant.rel_pos_query=quantized, recon.agq_encoder=True")
    assert (new["mean"], new["n"]) == (pytest.approx(0.50), 1)
    assert _cell(table, method="ptq4sam", other="-")["mean"] == pytest.approx(0.41)


def test_best_per_column_is_marked_within_each_encoder_group():
    table = pd.DataFrame({"encoder": ["quantized", "quantized", "FP", "FP", "FP"], "method": list("abcde"),
                          "setting": "W4A4", "metric": "mAP", "mean": [0.30, 0.35, 0.40, 0.38, 0.4001],
                          "std": math.nan, "n": 1})
    assert best_flags(table).tolist() == [False, True, True, False, True]  # 0.400 and 0.4001 tie as shown
    md = to_markdown(table)
    assert "| quantized | b | **0.350** |" in md and "| quantized | a | 0.300 |" in md
    assert "| FP | d | 0.380 |" in md and "| FP | c | **0.400** |" in md
    assert r"\textbf{0.350}" in to_latex(table) and r"\textbf{0.300}" not in to_latex(table)
    lines = to_latex(table).splitlines()
    second_rule = lines.index(r"\midrule", lines.index(r"\midrule") + 1)  # between the encoder groups
    assert lines[second_rule - 1].startswith("quantized & b") and lines[second_rule + 1].startswith("FP & c")


def test_latex_is_booktabs_and_escapes_special_characters(runs):
    tex = to_latex(ablation_tables(long_table(runs))["mac_readings"])
    lines = tex.splitlines()
    assert lines[0].startswith(r"\begin{tabular}") and lines[-1] == r"\end{tabular}"
    assert [ln for ln in lines if ln in (r"\toprule", r"\midrule", r"\bottomrule")] == [
        r"\toprule", r"\midrule", r"\bottomrule"]
    assert r"\multicolumn{3}{c}{W4A4}" in tex and r"token\_to\_image" in tex and "$\\pm$" not in tex
    assert "token_to_image" not in tex
    assert r"0.410 $\pm$ 0.014 (n=2)" in to_latex(ablation_tables(long_table(runs))["method_bits"])
    assert latex_escape("50% of a_b & c") == r"50\% of a\_b \& c"


def test_csv_round_trips_each_table(runs):
    paths = write_report(runs)
    tables = ablation_tables(long_table(runs))
    for name, table in tables.items():
        back = pd.read_csv(runs / "report" / f"{name}.csv", dtype={c: str for c in table.columns[:-5]})
        pd.testing.assert_frame_equal(back, table, check_dtype=False)
        assert runs / "report" / f"{name}.tex" in paths and runs / "report" / f"{name}.md" in paths
    assert paths[-1] == runs / "report" / "report.md"


def test_runs_table_still_has_one_row_per_run(runs):
    table = runs_table(runs)
    assert len(table) == 10 and list(table.columns[:8]) == ["run_id", "name", "method", "w_bits", "a_bits",
                                                           "prompts", "seed", "status"]
    assert table.loc[table["run_id"] == "r09-rtn", "eval/mAP"].item() == pytest.approx(0.30)
    assert len(runs_summary(long_table(runs))) == 9  # completed only


def test_label_defaults_agree_with_the_config_dataclasses():
    from carsam.config import JcarConfig, MacConfig

    assert MAC_DEFAULTS == dataclasses.asdict(MacConfig())
    assert JCAR_DEFAULTS == dataclasses.asdict(JcarConfig())


def test_a_non_default_mac_solver_is_its_own_mac_reading(tmp_path):
    make_run(tmp_path, "r1-default", "carsam", metrics(0.45), mac=MAC_ON, jcar=JCAR_ON)
    make_run(tmp_path, "r2-sylvester", "carsam", metrics(0.47), mac={"enabled": True, "solver": "sylvester"},
             jcar=JCAR_ON)
    long = long_table(tmp_path)
    labels = dict(zip(long["run_id"], long["mac"]))
    assert labels == {"r1-default": "qk@1", "r2-sylvester": "qk@1 solver=sylvester"}
    mac = ablation_tables(long)["mac_readings"][lambda t: t["metric"] == "mAP"]
    assert {r.solver: r.mean for r in mac.itertuples()} == pytest.approx({"target_queries": 0.45, "sylvester": 0.47})

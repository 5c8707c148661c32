"""`carsam report [--runs] [--out] [--figures]` writes the tables and figures and prints the Markdown."""

from __future__ import annotations

from carsam.cli import main

from .helpers import add_diagnostics, make_run, metrics


def test_report_command_writes_tables_figures_and_prints_markdown(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    add_diagnostics(make_run(runs, "r1-ptq4sam", "ptq4sam", metrics(0.40)))
    make_run(runs, "r2-ptq4sam", "ptq4sam", metrics(0.42), data_seed=1)
    make_run(runs, "r3-rtn", "rtn", metrics(0.30))
    assert main(["report", "--runs", str(runs), "--out", str(out), "--figures"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# carsam report") and "| quantized | ptq4sam | **0.410 ± 0.014 (n=2)** |" in printed
    for name in ("method_bits", "mac_jcar"):
        assert all((out / f"{name}.{ext}").is_file() for ext in ("md", "tex", "csv"))
    assert {p.name for p in (out / "figures").iterdir()} == {"attention_entropy.png", "mask_mass_t2i.png",
                                                             "recon_loss_r1-ptq4sam.png"}
    assert "skipped, no diagnostics.parquet: r2-ptq4sam, r3-rtn" in printed
    assert (out / "runs.csv").is_file() and (out / "long.csv").is_file()


def test_report_defaults_to_a_folder_inside_the_runs_folder(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs, "r1-rtn", "rtn", metrics(0.30))
    assert main(["report", "--runs", str(runs)]) == 0
    assert (runs / "report" / "report.md").read_text() in capsys.readouterr().out
    assert not (runs / "report" / "figures").exists()


def test_report_of_an_empty_folder_says_so(tmp_path, capsys):
    assert main(["report", "--runs", str(tmp_path / "none")]) == 0
    assert "no run records" in capsys.readouterr().out and not (tmp_path / "none").exists()

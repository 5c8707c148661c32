"""`--figures`: PNGs from the runs' diagnostics.parquet; runs without one are left out and named."""

from __future__ import annotations

import math
import sys

import pytest
from PIL import Image

from carsam.diagnostics.maps import write_attention_maps
from carsam.diagnostics.writer import read_diagnostics
from carsam.report.attention_maps import map_entropy, write_map_figures
from carsam.report.figures import layer_profile, recon_curves, write_figures

from .helpers import add_diagnostics, fake_attention_maps, make_run, metrics


@pytest.fixture()
def runs(tmp_path):
    """Two runs with diagnostics (entropy_q 0.7 / 0.8, mask mass 0.4 / 0.3) and attention maps, one without."""
    root = tmp_path / "runs"
    add_diagnostics(make_run(root, "r1-ptq4sam", "ptq4sam", metrics(0.40)), entropy_q=0.7, mass_q=0.4)
    add_diagnostics(make_run(root, "r2-carsam", "carsam", metrics(0.45), mac={"enabled": True}), 0.8, 0.3)
    make_run(root, "r3-rtn", "rtn", metrics(0.30))
    write_attention_maps(root / "r1-ptq4sam", fake_attention_maps(0.5))
    write_attention_maps(root / "r2-carsam", fake_attention_maps(0.1))
    return root


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
        return img.size


def test_figures_are_valid_pngs_and_runs_without_diagnostics_are_skipped(runs, tmp_path):
    result = write_figures(runs, tmp_path / "figures")
    names = sorted(p.name for p in result.written)
    assert names == ["attention_entropy.png", "attention_maps_7_0.png", "attention_maps_7_1.png",
                     "mask_mass_t2i.png", "recon_loss_r1-ptq4sam.png", "recon_loss_r2-carsam.png"]
    for path in result.written:
        width, height = _png_size(path)
        assert path.stat().st_size > 0 and width > 100 and height > 100
    assert result.skipped == ["r3-rtn"]


def test_attention_profile_averages_heads_per_layer(runs):
    diag = read_diagnostics(runs / "r1-ptq4sam")
    profile = layer_profile(diag, "decoder.token_to_image", "mask_mass_q")
    assert profile.index.tolist() == [0, 1, 2] and profile.tolist() == pytest.approx([0.4, 0.4, 0.4])
    assert layer_profile(diag, "decoder.self_attn", "entropy_fp").tolist() == pytest.approx([0.5, 0.5])


def test_recon_curves_keep_reconstruction_streams_with_their_oscillation_index(runs):
    curves = recon_curves(read_diagnostics(runs / "r1-ptq4sam"))
    assert {u: sorted(s) for u, s in curves.items()} == {"layers.0": ["keys", "queries"], "layers.1": ["queries"]}
    keys, index = curves["layers.0"]["keys"]
    assert keys["step"].tolist() == list(range(7))
    assert index == pytest.approx(0.0, abs=1e-12)  # halving every step: a straight line in log space
    assert curves["layers.0"]["queries"][1] > 0.1 and not math.isnan(curves["layers.0"]["queries"][1])


def test_no_figure_when_no_run_has_diagnostics(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "r1-rtn", "rtn", metrics(0.3))
    result = write_figures(root, tmp_path / "figures")
    assert result.written == [] and result.skipped == ["r1-rtn"]
    assert not (tmp_path / "figures").exists()


def test_figures_leave_pyplot_and_the_backend_alone(runs, tmp_path):
    import matplotlib

    had_pyplot = "matplotlib.pyplot" in sys.modules
    backend = dict.__getitem__(matplotlib.rcParams, "backend")  # the raw value: reading it resolves nothing
    write_figures(runs, tmp_path / "figures")
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules


def test_map_figures_leave_out_runs_of_another_fp_model(tmp_path, caplog):
    maps = {"a": fake_attention_maps(0.5), "b": fake_attention_maps(0.2), "other model": fake_attention_maps(0.2, 1)}
    with caplog.at_level("INFO", logger="carsam.report.attention_maps"):
        written = write_map_figures(maps, tmp_path)
    assert [p.name for p in written] == ["attention_maps_7_0.png", "attention_maps_7_1.png"]
    assert "other model" in caplog.text and "FP map differs" in caplog.text
    width, _ = _png_size(written[0])
    assert width > 300  # FP and two run columns


def test_map_entropy_is_one_for_uniform_and_zero_for_one_hot():
    import numpy as np

    assert map_entropy(np.full((4, 4), 1 / 16)) == pytest.approx(1.0)
    one_hot = np.zeros((4, 4))
    one_hot[1, 2] = 1.0
    assert map_entropy(one_hot) == pytest.approx(0.0)
    flattened = fake_attention_maps(0.5)
    assert map_entropy(flattened.q[0, 0]) > map_entropy(flattened.fp[0, 0])  # flattening raises H


def test_a_run_with_an_empty_diagnostics_table_draws_nothing_and_breaks_nothing(runs, tmp_path):
    from carsam.diagnostics.writer import write_diagnostics

    write_diagnostics(make_run(runs, "r4-fp", "fp", metrics(0.5)), "r4-fp", [])  # an FP run's table: no rows
    result = write_figures(runs, tmp_path / "figures")
    assert "recon_loss_r4-fp.png" not in {p.name for p in result.written}
    assert "attention_entropy.png" in {p.name for p in result.written}

"""analysis/ablation.ipynb runs headless (nbconvert's ExecutePreprocessor) on a folder of fake records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbconvert.preprocessors import ExecutePreprocessor

from .helpers import add_diagnostics, make_run, metrics

pytestmark = pytest.mark.slow
NOTEBOOK = Path(__file__).resolve().parents[2] / "analysis" / "ablation.ipynb"


def _this_python_kernel(root: Path) -> Path:
    """A `python3` kernelspec that starts this interpreter (put first on JUPYTER_PATH, so a user-level
    `python3` spec pointing elsewhere cannot win)."""
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (carsam venv)", "language": "python"}))
    return root


def _texts(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts += [out.get("text", ""), *(str(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))]
    return "\n".join(parts)


def test_ablation_notebook_executes_and_shows_tables_and_figures(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    add_diagnostics(make_run(runs, "r1-ptq4sam", "ptq4sam", metrics(0.40)))
    make_run(runs, "r2-ptq4sam", "ptq4sam", metrics(0.42), data_seed=1)
    make_run(runs, "r3-carsam", "carsam", metrics(0.45), mac={"enabled": True}, jcar={"enabled": True})
    make_run(runs, "r4-rtn", "rtn", {}, status="failed", error="ValueError: boom", total=None)
    monkeypatch.setenv("JUPYTER_PATH", str(_this_python_kernel(tmp_path / "jupyter")))
    monkeypatch.setenv("CARSAM_RUNS", str(runs))
    monkeypatch.setenv("CARSAM_FIGURES", str(tmp_path / "figures"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    ExecutePreprocessor(timeout=120, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(NOTEBOOK.parent)}})
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
    text = _texts(nb)
    assert "3 completed runs" in text and "| ptq4sam | 0.410 ± 0.014 (n=2) |" in text  # data seeds 0, 1
    assert "| quantized | carsam | on | on | **0.450** |" in text and "ValueError: boom" in text
    pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pngs) == 3 and sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "attention_entropy.png", "mask_mass_t2i.png", "recon_loss_r1-ptq4sam.png"]
    assert "r2-ptq4sam, r3-carsam" in text  # left out of the figures: no diagnostics

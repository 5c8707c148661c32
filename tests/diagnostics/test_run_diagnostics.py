"""Diagnostics and tracking wired into runs: every run writes diagnostics.parquet whose summaries are the
record's `diag/*` metrics, reconstruction curves land in it, and neither a diagnostics nor a W&B failure
loses the evaluation."""

from __future__ import annotations

import json
import logging
import sys
import types

import pytest

from carsam import pipeline
from carsam.config import resolve
from carsam.diagnostics import run as run_diagnostics
from carsam.diagnostics.writer import DIAGNOSTICS_FILE, read_diagnostics, summary_metrics
from carsam.record import RECORD_FILE
from tests.helpers import experiment, real_data_overrides


def _config(tmp_path, small_coco, checkpoint, name: str, *overrides: str):
    return resolve(experiment(name), [f"runs_dir={tmp_path}", f"model.checkpoint={checkpoint}", "data.calib_size=2",
                                      "diagnostics.images=2", *real_data_overrides(small_coco), *overrides])


def _saved(tmp_path, record) -> dict:
    return json.loads((tmp_path / record.run_id / RECORD_FILE).read_text())


def test_a_quantized_run_writes_diagnostics_whose_summary_is_the_records_diag_metrics(
        tmp_path, small_coco, random_testbed_checkpoint):
    record = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, "rtn_w4a4.yaml"))
    frame = read_diagnostics(tmp_path / record.run_id)
    assert set(frame["run_id"]) == {record.run_id}
    assert {"decoder.self_attn", "decoder.token_to_image", "decoder.image_to_token"} <= set(frame["module"])
    saved = _saved(tmp_path, record)
    diag = {k: v for k, v in saved["metrics"].items() if k.startswith("diag/")}
    assert diag == pytest.approx(summary_metrics(frame)) and "diag/entropy_gap_t2i" in diag
    assert "eval/mAP" in saved["metrics"] and saved["details"]["diagnostics"]["images"]
    assert len(saved["details"]["diagnostics"]["images"]) == 2


def test_a_reconstruction_run_records_its_loss_curves_and_oscillation_index(tmp_path, small_coco,
                                                                           random_testbed_checkpoint):
    record = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, "brecq_w4a4_decoder_only.yaml",
                                  "recon.iters=12", "recon.interference_images=1"))
    frame = read_diagnostics(tmp_path / record.run_id)
    units = record.details["recon"]["units"]
    losses = frame[frame["kind"] == "loss/out"]
    assert set(losses["module"]) == {u["unit"] for u in units}
    first = units[0]
    assert losses[losses["module"] == first["unit"]]["value"].tolist() == pytest.approx(first["curve"]["out"])
    assert "diag/oscillation_index" in record.metrics and "diag/interference" in record.metrics


def test_a_diagnostics_failure_keeps_the_evaluation_and_says_why(tmp_path, small_coco, random_testbed_checkpoint,
                                                                monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("collector exploded")

    monkeypatch.setattr(pipeline, "diagnose_run", broken)
    with caplog.at_level(logging.WARNING, logger="carsam.pipeline"):
        record = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, "rtn_w8a8.yaml"))
    saved = _saved(tmp_path, record)
    assert saved["status"] == "completed" and "eval/mAP" in saved["metrics"]
    assert saved["details"]["diagnostics"] == {"error": "RuntimeError: collector exploded"}
    assert "diagnostics failed" in caplog.text


def test_disabled_diagnostics_write_nothing(tmp_path, small_coco, random_testbed_checkpoint):
    record = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, "rtn_w8a8.yaml",
                                  "diagnostics.enabled=false"))
    assert not (tmp_path / record.run_id / DIAGNOSTICS_FILE).exists()
    assert not any(k.startswith("diag/") for k in record.metrics)


def test_an_fp_run_has_no_attention_rows_and_says_so(tmp_path, small_coco, random_testbed_checkpoint):
    record = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, "fp.yaml"))
    assert len(read_diagnostics(tmp_path / record.run_id)) == 0
    assert record.details["diagnostics"]["attention"].startswith("skipped")


def test_scopes_left_in_fp_are_not_collected():
    config = resolve(experiment("rtn_w4a4.yaml"), ["quant.quantize_encoder=false",
                                                   "diagnostics.scopes=[encoder, decoder]"])
    assert run_diagnostics.quantized_scopes(config) == ["decoder"]


def test_diagnostic_images_are_the_first_ones_with_prompts():
    class Fake:
        image_ids = [3, 1, 4, 5, 9]

        def prompts(self, image_id):
            return ([] if image_id in (1, 5) else [[0, 0, 1, 1]],)

    assert run_diagnostics.diagnostic_images(Fake(), 2) == [3, 4]
    assert run_diagnostics.diagnostic_images(Fake(), 10) == [3, 4, 9]


@pytest.mark.wandb
def test_an_offline_wandb_run_is_written_into_the_run_folder_and_its_id_recorded(
        tmp_path, small_coco, random_testbed_checkpoint, monkeypatch):
    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    record = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, "rtn_w8a8.yaml",
                                  "tracking.group=study-x"))
    wandb_id = _saved(tmp_path, record)["details"]["wandb"]["id"]
    assert list((tmp_path / record.run_id / "wandb").glob(f"offline-run-*-{wandb_id}"))


@pytest.mark.wandb
def test_a_wandb_failure_is_a_warning_and_the_run_completes(tmp_path, small_coco, random_testbed_checkpoint,
                                                            monkeypatch, caplog):
    broken = types.ModuleType("wandb")

    def init(**kwargs):
        raise ConnectionError("no network")

    broken.init, broken.Settings = init, lambda **kwargs: None
    monkeypatch.setitem(sys.modules, "wandb", broken)
    with caplog.at_level(logging.WARNING, logger="carsam.tracking"):
        record = pipeline.run(_config(tmp_path, small_coco, random_testbed_checkpoint, "rtn_w8a8.yaml",
                                      "tracking.mode=online"))
    saved = _saved(tmp_path, record)
    assert saved["status"] == "completed" and "eval/mAP" in saved["metrics"] and "wandb" not in saved["details"]
    assert "W&B start failed" in caplog.text

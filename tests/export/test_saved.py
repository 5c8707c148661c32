"""Saved quantized models (carsam.export.saved): a reload gives the run's evaluation bit for bit, `carsam eval`
re-evaluates without the method, and every file that does not fit is refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from carsam import cli
from carsam.config import ConfigError, resolve
from carsam.export.saved import MANIFEST_FILE, MODEL_FILE, SavedModelError, load_quantized, save_quantized
from carsam.models.quantize import QuantConfig
from carsam.quant.logquant import LogQuantizer
from carsam.quant.quantizers import UniformQuantizer, iter_quantizers
from carsam.quant.state import assert_eval_ready
from tests.helpers import decode_box, experiment


def test_reload_is_bit_identical_with_log_quantizers_and_learned_scales(tmp_path, quantized_testbed):
    sam, image = quantized_testbed
    saved = save_quantized(sam, tmp_path, {"type": "testbed", "checkpoint": "c", "sha256": "s"}, QuantConfig(),
                           {"run_id": "r", "method": "rtn"})
    loaded = load_quantized(tmp_path)
    assert_eval_ready(loaded)
    assert saved["bytes"] == (tmp_path / MODEL_FILE).stat().st_size
    for before, after in zip(decode_box(sam, image), decode_box(loaded, image)):
        assert torch.equal(before, after)
    attention = loaded.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    assert isinstance(attention.pv_matmul.lhs_quantizer, LogQuantizer) and attention.pv_matmul.lhs_quantizer.tau == 4
    assert isinstance(attention.qk_matmul.lhs_quantizer.scale, torch.nn.Parameter)


def test_manifest_lists_every_quantizer_with_its_qparams(tmp_path, quantized_testbed):
    sam, _ = quantized_testbed
    save_quantized(sam, tmp_path, {"type": "testbed", "checkpoint": "c", "sha256": "s"}, QuantConfig(), {})
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    quantizers = dict(iter_quantizers(sam))
    assert set(manifest["quantizers"]) == set(quantizers)
    for path, entry in manifest["quantizers"].items():
        quantizer = quantizers[path]
        assert entry["bits"] == quantizer.bits and entry["mode"] == "quantized"
        assert torch.equal(torch.tensor(entry["scale"], dtype=torch.float32), quantizer.scale.detach())
        if isinstance(quantizer, UniformQuantizer):
            assert entry["kind"] == "uniform" and entry["ch_axis"] == quantizer.ch_axis
            assert torch.equal(torch.tensor(entry["zero_point"], dtype=torch.float32), quantizer.zero_point)


def _corrupt_weights(run_dir: Path) -> None:
    data = bytearray((run_dir / MODEL_FILE).read_bytes())
    data[-8:] = b"\x00" * 8
    (run_dir / MODEL_FILE).write_bytes(bytes(data))


def _other_structure(run_dir: Path) -> None:
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
    manifest["structure_sha256"] = "0" * 64
    (run_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


def _other_model(run_dir: Path) -> None:
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
    manifest["model"]["type"] = "vit_b"
    (run_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / MANIFEST_FILE).unlink(), "no saved model"),
    (lambda d: (d / MANIFEST_FILE).write_text("{not json"), "not a JSON manifest"),
    (lambda d: (d / MODEL_FILE).unlink(), "saved weights missing"),
    (_corrupt_weights, "does not match its manifest's SHA-256"),
    (_other_model, "fit model type 'vit_b'"),
    (_other_structure, "another structure than the one saved"),
])
def test_a_saved_model_that_does_not_fit_is_refused_with_one_line(tmp_path, quantized_testbed, damage, message):
    sam, _ = quantized_testbed
    save_quantized(sam, tmp_path, {"type": "testbed", "checkpoint": "c", "sha256": "s"}, QuantConfig(), {})
    damage(tmp_path)
    with pytest.raises(SavedModelError, match=message) as err:
        load_quantized(tmp_path)
    assert "\n" not in str(err.value)


def test_carsam_eval_reproduces_the_runs_evaluation_and_diagnostics_bit_for_bit(carsam_run, capsys):
    assert cli.main(["eval", str(carsam_run), "--no-progress"]) == 0
    source = json.loads((carsam_run / "record.json").read_text())
    run_id = capsys.readouterr().out.split()[0]
    again = json.loads((carsam_run.parent / run_id / "record.json").read_text())
    # diag/* included (FP passes see the FP weights again), less what the reconstruction itself measured
    assert again["metrics"] == {k: v for k, v in source["metrics"].items() if k != "diag/interference"}
    assert again["details"]["source_run"]["run_id"] == source["run_id"]
    assert again["details"]["source_run"]["fp_references"] > 0  # MAC and the bake changed weights in place
    assert "method" not in again["timings"] and "saved_model" not in again["details"]
    for name in ("segm_results.json", "segm_results_gt_boxes.json"):
        assert (carsam_run / name).read_bytes() == (carsam_run.parent / run_id / name).read_bytes()


def test_carsam_eval_changes_the_protocol_without_rerunning_the_method(carsam_run, capsys):
    assert cli.main(["eval", str(carsam_run), "data.prompt_source=gt_boxes", "diagnostics.enabled=false",
                     "--no-progress"]) == 0
    source = json.loads((carsam_run / "record.json").read_text())
    again = json.loads((carsam_run.parent / capsys.readouterr().out.split()[0] / "record.json").read_text())
    assert again["prompts"] == "gt_boxes" and again["name"].endswith("+eval+data.prompt_source=gt_boxes")
    assert again["metrics"]["eval/mAP"] == source["metrics"]["eval/gt_box_mAP"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["quant.w_bits=8"], "would change the model itself"),
    (["model.checkpoint={other}"], "is not the one the model in"),
])
def test_carsam_eval_refuses_what_would_change_the_model(carsam_run, tmp_path, capsys, overrides, message):
    other = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(1)}, other)
    code = cli.main(["eval", str(carsam_run), *[o.format(other=other) for o in overrides], "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_carsam_eval_of_a_folder_without_a_model_names_the_setting(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert "output.save_model=true" in capsys.readouterr().err


def test_models_are_saved_by_default_only_for_methods_that_train():
    saves = {m: resolve(experiment(f"{m}_w4a4.yaml") if m != "fp" else experiment("fp.yaml")).saves_model
             for m in ("rtn", "omse", "brecq", "qdrop", "ptq4sam", "carsam", "fp")}
    assert saves == {"rtn": False, "omse": False, "brecq": True, "qdrop": True, "ptq4sam": True, "carsam": True,
                     "fp": False}
    assert resolve(experiment("rtn_w4a4.yaml"), ["output.save_model=true"]).saves_model
    assert not resolve(experiment("carsam_w4a4.yaml"), ["output.save_model=false"]).saves_model
    with pytest.raises(ConfigError, match="needs a quantizing method"):
        resolve(experiment("fp.yaml"), ["output.save_model=true"])

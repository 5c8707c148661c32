"""The reliability matrix (issue 15): bad inputs and faults end in one line on stderr and exit 2, a failed record
with the reason, and no change to records already written; nothing non-finite is ever scored as a result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from carsam.cli import main
from carsam.eval.inference import SamBoxPredictor
from carsam.models.finite import NonFiniteError, check_finite_, non_finite_tensors
from carsam.record import list_records
from carsam.testbed.spec import build_testbed_from_checkpoint
from tests.helpers import experiment, real_data_overrides


def _run(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """`carsam run ARGV --no-progress`: (exit code, last stderr line, every stderr line)."""
    code = main(["run", *argv, "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else "", lines


@pytest.fixture()
def base_args(tmp_path, small_coco, random_testbed_checkpoint) -> list[str]:
    """An RTN W8A8 run of the random testbed on the small real-path set (about a second), runs under tmp."""
    return [experiment("rtn_w8a8.yaml"), f"runs_dir={tmp_path / 'runs'}",
            f"model.checkpoint={random_testbed_checkpoint}", "data.calib_size=2", "diagnostics.enabled=false",
            "tracking.mode=disabled", *real_data_overrides(small_coco)]


@pytest.fixture()
def earlier_run(capsys, tmp_path, base_args) -> dict:
    """One completed run under the runs folder; the cases assert it is unchanged after theirs."""
    code, _, _ = _run(capsys, *base_args)
    assert code == 0
    return {r["run_id"]: r for r in list_records(tmp_path / "runs")}


def _assert_failed_cleanly(tmp_path: Path, before: dict, message: str) -> dict:
    """Every earlier record unchanged; exactly one new record, `failed`, whose error holds `message`."""
    after = {r["run_id"]: r for r in list_records(tmp_path / "runs")}
    assert all(after[k] == v for k, v in before.items())
    new = [r for k, r in after.items() if k not in before]
    assert len(new) == 1 and new[0]["status"] == "failed" and message in new[0]["error"], new
    assert not new[0].get("metrics")  # nothing was scored
    return new[0]


def _poisoned_checkpoint(source: Path, folder: Path, name: str, value: float) -> Path:
    """A copy of the checkpoint `source` with `value` (NaN or Inf) in one element of tensor `name`."""
    state = torch.load(source, weights_only=True)
    state[name] = state[name].clone()
    state[name].view(-1)[3] = value
    path = folder / f"poisoned_{name}.pth"
    torch.save(state, path)
    return path


# ---------- non-finite weights and outputs ----------

@pytest.mark.parametrize(("tensor", "value"), [("mask_decoder.transformer.layers.0.cross_attn_token_to_image"
                                                 ".q_proj.weight", float("nan")),
                                                ("image_encoder.blocks.0.mlp.lin1.weight", float("inf"))])
def test_a_checkpoint_with_one_non_finite_weight_is_refused(capsys, tmp_path, base_args, earlier_run,
                                                          random_testbed_checkpoint, tensor, value):
    bad = _poisoned_checkpoint(random_testbed_checkpoint, tmp_path, tensor, value)
    code, line, lines = _run(capsys, *base_args, f"model.checkpoint={bad}")
    assert code == 2 and line.startswith("carsam: error: non-finite values after loading the checkpoint")
    assert tensor in line and "1 NaN/Inf" in line and not any("Traceback" in x for x in lines)
    _assert_failed_cleanly(tmp_path, earlier_run, tensor)


def test_the_guard_names_the_stage_the_tensor_and_how_many_more():
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    with torch.no_grad():
        module[0].weight[0, 0] = float("nan")
        module[0].bias[1] = float("inf")
    module[1].running_mean[2] = float("-inf")  # buffers are checked too
    assert [name for name, _, _ in non_finite_tensors(module)] == ["0.weight", "0.bias", "1.running_mean"]
    with pytest.raises(NonFiniteError, match=r"after MAC: 0\.weight has 1 NaN/Inf of 9 \(and 2 more tensors\)"):
        check_finite_(module, "MAC")
    check_finite_(torch.nn.Linear(2, 2), "anything")  # finite: no error


def test_a_non_finite_decoder_output_stops_the_evaluation(random_testbed_checkpoint, small_coco):
    from carsam.data.coco import CocoBoxPrompts

    val = CocoBoxPrompts(small_coco["images"], small_coco["annotations"], small_coco["prompts"])
    sam = build_testbed_from_checkpoint(random_testbed_checkpoint)
    with torch.no_grad():
        sam.mask_decoder.iou_prediction_head.layers[-1].bias.fill_(float("nan"))
    predictor = SamBoxPredictor(sam)
    image_id = val.image_ids[0]
    with pytest.raises(NonFiniteError, match="IoU predictions hold"):
        predictor.predict(predictor.embed_image(val, image_id), val.prompts(image_id)[0])


def test_a_sweep_records_a_non_finite_trial_as_failed_not_as_a_score(tmp_path, small_coco,
                                                                     random_testbed_checkpoint):
    from carsam.sweep.runner import run_sweep
    from tests.sweep.helpers import write_space

    bad = _poisoned_checkpoint(random_testbed_checkpoint, tmp_path, "mask_decoder.output_upscaling.0.weight",
                               float("nan"))
    space = write_space(tmp_path, {"model.checkpoint": [str(bad), str(random_testbed_checkpoint)]})
    study = run_sweep(space, trials=2, runs_dir=str(tmp_path / "runs"),
                      overrides=[*real_data_overrides(small_coco), "data.calib_size=2", "diagnostics.enabled=false",
                                 "tracking.mode=disabled"])
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert "non-finite values after loading the checkpoint" in study.trials[0].user_attrs["error"]
    assert "eval/mAP" not in study.trials[0].user_attrs

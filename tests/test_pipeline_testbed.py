"""End to end on the shipped, trained testbed: known answers from its card, and the expected
ordering FP ≈ W8A8 > W4A4 with the box-as-mask floor below FP."""

from __future__ import annotations

import json

import pytest

from carsam import pipeline
from carsam.config import resolve
from carsam.files import file_sha256
from carsam.testbed.shipped import SHIPPED_TESTBEDS
from tests.helpers import experiment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    """The seed-0 synthetic calib/val splits, generated once into a temporary folder."""
    return tmp_path_factory.mktemp("synthetic")


def _run(tmp_path, root, name: str, *overrides: str) -> dict[str, float]:
    config = resolve(experiment(name), [f"runs_dir={tmp_path}", f"data.synthetic_root={root}", *overrides])
    record = pipeline.run(config)
    assert record.status == "completed"
    return record.metrics


SHIPPED = [(name, testbed.checkpoint, testbed.card) for name, testbed in SHIPPED_TESTBEDS.items()]


@pytest.mark.parametrize(("model_type", "checkpoint", "card_path"), SHIPPED, ids=[s[0] for s in SHIPPED])
def test_shipped_checkpoint_is_the_one_its_card_describes(model_type, checkpoint, card_path):
    card = json.loads(card_path.read_text())
    assert file_sha256(checkpoint) == card["checkpoint_sha256"] and card["checkpoint"] == checkpoint.name
    assert checkpoint.stat().st_size == card["checkpoint_bytes"] < 20e6
    testbed = SHIPPED_TESTBEDS[model_type]
    assert (card["data_spec"].get("family", "shapes"), card["data_spec"]["seed"]) == (testbed.family, testbed.seed)
    assert card.get("architecture", "sam") == testbed.architecture


@pytest.mark.parametrize(("model_type", "checkpoint", "card_path"), SHIPPED, ids=[s[0] for s in SHIPPED])
def test_fp_run_reproduces_the_cards_fp_metrics(tmp_path, synthetic_root, model_type, checkpoint, card_path):
    card = json.loads(card_path.read_text())["fp_metrics"]
    testbed = SHIPPED_TESTBEDS[model_type]
    metrics = _run(tmp_path, synthetic_root, "fp.yaml", f"model.type={model_type}",
                   f"data.synthetic_family={testbed.family}", f"data.synthetic_seed={testbed.seed}")
    # the same code, data and weights: equal up to float summation order across BLAS builds
    assert {key: metrics[key] for key in card} == pytest.approx(card, abs=2e-3)


def test_w8a8_is_close_to_fp_and_w4a4_is_worse(tmp_path, synthetic_root):
    subset = ["data.max_val_images=40", "data.calib_size=8"]
    fp = _run(tmp_path, synthetic_root, "fp.yaml", *subset)
    w8 = _run(tmp_path, synthetic_root, "rtn_w8a8.yaml", *subset)
    w4 = _run(tmp_path, synthetic_root, "rtn_w4a4.yaml", *subset)
    assert abs(w8["eval/mIoU"] - fp["eval/mIoU"]) < 0.02
    assert w4["eval/mIoU"] < w8["eval/mIoU"] - 0.02


def test_box_as_mask_floor_is_below_fp(tmp_path, synthetic_root):
    subset = ["data.max_val_images=40"]
    fp = _run(tmp_path, synthetic_root, "fp.yaml", *subset)
    floor = _run(tmp_path, synthetic_root, "box_as_mask.yaml", *subset)
    assert floor["eval/mIoU"] < fp["eval/mIoU"] and floor["eval/mAP"] < fp["eval/mAP"]

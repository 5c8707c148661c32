"""Every run writes its scored masks as a COCO results file that pycocotools alone re-scores to the record's mAP."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from carsam import pipeline
from carsam.config import resolve
from tests.helpers import experiment, real_data_overrides


def _rescore(run_dir: Path, segm: dict, file_key: str = "file") -> tuple[float, float]:
    """COCO segm mAP and mAP50 of the run's results file (`segm[file_key]`), by pycocotools only."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(segm["annotations"])
        evaluator = COCOeval(gt, gt.loadRes(json.loads((run_dir / segm[file_key]).read_text())), "segm")
        evaluator.params.imgIds = sorted(segm["image_ids"])
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0]), float(evaluator.stats[1])


@pytest.mark.parametrize("name", ["box_as_mask.yaml", "fp.yaml"])
def test_results_file_rescores_to_the_records_map_exactly(tmp_path, small_coco, name):
    config = resolve(experiment(name), [f"runs_dir={tmp_path}", "data.calib_size=2", "data.max_val_images=4",
                                        "diagnostics.enabled=false", *real_data_overrides(small_coco)])
    record = pipeline.run(config)  # fp: the shipped testbed checkpoint
    segm = record.details["segm_results"]
    assert len(segm["image_ids"]) == record.details["eval_images"] == 4
    assert record.metrics["eval/mAP"] > 0.05  # a real score, not an empty evaluation
    run_dir = tmp_path / record.run_id
    assert _rescore(run_dir, segm) == (record.metrics["eval/mAP"], record.metrics["eval/mAP50"])
    assert segm["gt_box_file"] != segm["file"]  # detector prompts: the GT-box decodes have their own file
    assert _rescore(run_dir, segm, "gt_box_file") == (record.metrics["eval/gt_box_mAP"],
                                                     record.metrics["eval/gt_box_mAP50"])

"""The `carsam` command: run, sweep, report, testbed."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from carsam.config import ConfigError
from carsam.data.coco import DatasetError
from carsam.methods.calibrate import CalibrationError
from carsam.models.sam import CheckpointError

USER_ERRORS = (ConfigError, DatasetError, CheckpointError, CalibrationError, OSError)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _cmd_run(args: argparse.Namespace) -> int:
    from carsam import pipeline
    from carsam.config import resolve

    config = resolve(args.experiment, args.overrides)
    record = pipeline.run(config, progress=not args.no_progress)
    metrics = "  ".join(f"{k}={v:.4f}" for k, v in record.metrics.items())
    print(f"{record.run_id}  {record.status}  {metrics}")
    print(f"record: {config.runs_dir}/{record.run_id}/record.json")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    import optuna

    from carsam.sweep import run_sweep, trials_table

    if not args.verbose:  # keep the progress bar readable: per-run logs go to each run's record
        logging.getLogger("carsam").setLevel(logging.WARNING)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = run_sweep(args.space, trials=args.trials, storage=args.storage, study_name=args.study,
                      runs_dir=args.runs, overrides=args.overrides, progress=not args.no_progress)
    table = trials_table(study)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    completed = [t for t in study.trials if t.value is not None]
    if not completed:
        print("carsam: error: no trial completed (see the 'error' column)", file=sys.stderr)
        return 1
    best = study.best_trial
    print(f"best trial {best.number}: eval/mAP={best.value:.4f} params={best.params}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from carsam.report import runs_table

    table = runs_table(args.runs)
    if table.empty:
        print(f"no run records under {args.runs}")
        return 0
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def _cmd_testbed_data(args: argparse.Namespace) -> int:
    from carsam.data.synthetic import SyntheticSpec, dataset_dir, ensure_dataset

    root = ensure_dataset(SyntheticSpec(seed=args.seed), dataset_dir(args.root, args.seed), tuple(args.splits))
    print(f"synthetic dataset (seed {args.seed}, splits {', '.join(args.splits)}) in {root}")
    return 0


def _cmd_testbed_build(args: argparse.Namespace) -> int:
    from carsam.testbed_build import build_testbed

    card = build_testbed(data_root=args.root, seed=args.seed, steps=args.steps, out_dir=args.out)
    print(f"testbed checkpoint: {args.out}/{card['checkpoint']}  train time {card['train_seconds']:.0f}s  "
          f"val mIoU (GT boxes) {card['fp_metrics']['eval/mIoU']:.4f}")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="one run from an experiment YAML, writing one run record",
                       description="Resolve defaults <- EXPERIMENT <- overrides, run it, write runs/<id>/.")
    p.add_argument("experiment", help="experiment YAML (e.g. experiments/rtn_w4a4.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. quant.w_bits=6 data.max_val_images=50")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_run)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="an Optuna study over a search space file; each trial is a run record",
                       description="Run (or resume) an Optuna study defined by a search-space Python file.")
    p.add_argument("space", help="search space file (e.g. sweeps/rtn_bits.py)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every trial")
    p.add_argument("--trials", type=_positive_int, default=9, help="number of trials to run (default 9)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///RUNS/optuna.db)")
    p.add_argument("--study", default=None, help="study name (default: the space file's name)")
    p.add_argument("--runs", default="runs", help="runs folder (default runs)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_sweep)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="a table of all run records", description="Read runs/*/record.json "
                       "into one table (method, bits, metrics, timings).")
    p.add_argument("--runs", default="runs", help="runs folder (default runs)")
    p.set_defaults(func=_cmd_report)


def _add_testbed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("testbed", help="generate the synthetic dataset or train the testbed SAM",
                       description="The embedded default: a small SAM trained on synthetic COCO-format data.")
    tsub = p.add_subparsers(dest="testbed_command", required=True, metavar="{data,build}")
    d = tsub.add_parser("data", help="generate the synthetic dataset (deterministic by seed)",
                        description="Write images, instances_<split>.json and prompts_<split>.json.")
    d.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    d.add_argument("--root", default="data", help="parent folder (default data); writes ROOT/testbed-seedN")
    d.add_argument("--splits", nargs="+", default=["train", "calib", "val"], choices=["train", "calib", "val"])
    d.set_defaults(func=_cmd_testbed_data)
    b = tsub.add_parser("build", help="generate the data and train the testbed SAM (about an hour on 2 cores)",
                        description="Generate the dataset, train the testbed, save the fp16 checkpoint and a JSON "
                        "card with its FP metrics and training provenance.")
    b.add_argument("--seed", type=int, default=0, help="dataset and training seed (default 0)")
    b.add_argument("--root", default="data", help="data parent folder (default data)")
    b.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: the recipe's)")
    b.add_argument("--out", default="build/testbed", help="output folder (default build/testbed; the shipped "
                   "pair is carsam/assets/testbed_sam.pth + testbed.json)")
    b.set_defaults(func=_cmd_testbed_build)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carsam", description="4-bit PTQ of Segment Anything: CAR-SAM and "
                                     "the baselines it is compared with, on SAM or the embedded testbed.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,sweep,report,testbed}")
    for add in (_add_run, _add_sweep, _add_report, _add_testbed):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if args.verbose:
            logging.exception("user error")
        print(f"carsam: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

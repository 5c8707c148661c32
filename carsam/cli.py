"""The `carsam` command: run, eval, export, sweep, report, dashboard, stats, testbed, clean."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from carsam.config import ConfigError
from carsam.data.coco import DatasetError
from carsam.data.synthetic import FAMILIES as SYNTHETIC_FAMILIES
from carsam.export.packed import PackError
from carsam.methods.calibrate import CalibrationError
from carsam.models.checkpoint import CheckpointError
from carsam.models.finite import NonFiniteError

USER_ERRORS = (ConfigError, DatasetError, CheckpointError, CalibrationError, NonFiniteError, PackError, OSError)


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 0..65535, got {text}")
    return value


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _print_record(record: Any, runs_dir: str) -> None:
    """The finished run's id, status and metrics, and where its record is."""
    metrics = "  ".join(f"{k}={v:.4f}" for k, v in record.metrics.items())
    print(f"{record.run_id}  {record.status}  {metrics}")
    print(f"record: {runs_dir}/{record.run_id}/record.json")


def _cmd_run(args: argparse.Namespace) -> int:
    from carsam import pipeline
    from carsam.config import resolve

    config = resolve(args.experiment, args.overrides)
    record = pipeline.run(config, progress=not args.no_progress)
    _print_record(record, config.runs_dir)
    return 0


EVAL_OVERRIDES = ("data.", "device=", "runs_dir=", "name=", "seed=", "diagnostics.", "tracking.", "cache.",
                  "model.checkpoint=")  # what a re-evaluation may change; the rest made the saved model


def _cmd_eval(args: argparse.Namespace) -> int:
    from carsam import pipeline
    from carsam.config import resolve
    from carsam.export.saved import read_manifest
    from carsam.record import CONFIG_FILE

    run_dir = Path(args.run_dir)
    read_manifest(run_dir)  # one line when the folder holds no saved model, before anything is built
    fixed = [o for o in args.overrides if not o.startswith(EVAL_OVERRIDES)]
    if fixed:
        raise ConfigError(f"carsam eval re-evaluates a saved model: '{fixed[0]}' would change the model itself; only "
                          f"{', '.join(p.rstrip('=.') for p in EVAL_OVERRIDES)} can be set (rerun the method instead)")
    source = resolve(run_dir / CONFIG_FILE)
    named = [o for o in args.overrides if o.startswith("name=")]
    changes = [o for o in args.overrides if o.startswith(("data.prompt_source=", "data.max_val_images=",
                                                          "data.synthetic_seed="))]
    name = "+".join([source.name or source.method, "eval", *changes])
    config = resolve(run_dir / CONFIG_FILE, [f"name={name}", *args.overrides] if not named else args.overrides)
    record = pipeline.run(config, progress=not args.no_progress, saved=run_dir)
    _print_record(record, config.runs_dir)
    return 0


PACKED_FILE = "model_packed.safetensors"
ONNX_FOLDER = "onnx"


def _cmd_export(args: argparse.Namespace) -> int:
    from carsam.export.packed import export_packed
    from carsam.export.saved import MODEL_FILE, load_quantized, read_manifest

    run_dir = Path(args.run_dir)
    manifest = read_manifest(run_dir)
    sam = load_quantized(run_dir)
    if args.format == "onnx":
        from carsam.export.onnx_graph import export_onnx

        folder = Path(args.out) if args.out else run_dir / ONNX_FOLDER
        for name, graph in export_onnx(sam, folder).items():
            print(f"{graph['file']}: {graph['bytes'] / 1e6:.2f} MB, {graph['quantize_linear']} QuantizeLinear, "
                  f"{graph['dequantize_linear']} DequantizeLinear (opset 21, onnxruntime CPU)")
        return 0
    out = Path(args.out) if args.out else run_dir / PACKED_FILE
    written = export_packed(sam, out, manifest["model"]["type"])
    fake_quant = (run_dir / MODEL_FILE).stat().st_size
    print(f"{out}: {written['bytes'] / 1e6:.2f} MB ({written['weights']} weights at {written['weight_bits']} bits, "
          f"{written['activations']} activation quantizers, {written['fp_entries']} FP entries as fp16); "
          f"the fake-quant model: {fake_quant / 1e6:.2f} MB")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    import optuna

    from carsam.sweep.runner import run_sweep
    from carsam.sweep.storage import default_storage
    from carsam.sweep.summary import best_trials, objective_names, trials_table

    if not args.verbose:  # keep the progress bar readable: per-run logs go to each run's record
        logging.getLogger("carsam").setLevel(logging.WARNING)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = args.storage or default_storage(args.runs, args.workers)
    if not args.storage and args.workers > 1:
        print(f"carsam: {args.workers} workers share a journal file, not SQLite (it locks under concurrent "
              f"writers): --storage {storage} (pass it to resume or inspect the study)", file=sys.stderr)
    study = run_sweep(args.space, trials=args.trials, storage=storage, study_name=args.study, runs_dir=args.runs,
                      seed=args.seed, overrides=args.overrides, progress=not args.no_progress,
                      workers=args.workers, heartbeat=args.heartbeat)
    print(trials_table(study).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    best = best_trials(study)
    if not best:
        print("carsam: error: no trial completed (see the 'error' column)", file=sys.stderr)
        return 1
    print("best trial:" if len(study.directions) == 1 else f"Pareto front ({len(best)} trials):")
    for t in best:
        values = "  ".join(f"{name}={v:.4f}" for name, v in zip(objective_names(study), t.values))
        print(f"  trial {t.number}: {values}  params={t.params}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from carsam.report.tables import write_report

    if args.status:
        return _print_status(args.runs)
    paths = write_report(args.runs, args.out, figures=args.figures)
    if not paths:
        print(f"no run records under {args.runs}")
        return 0
    print(paths[-1].read_text())  # report.md: the Markdown tables
    print(f"wrote {len(paths)} files to {paths[-1].parent}", file=sys.stderr)
    return 0


def _print_status(runs: str) -> int:
    from carsam.record import list_records

    records = list_records(runs)
    if not records:
        print(f"no run records under {runs}")
        return 0
    for rec in records:
        note = rec.get("status_note") or rec.get("error") or ""
        print(f"{rec.get('run_id', '?')}  {rec.get('status', '?'):<11}  {note}".rstrip())
    return 0


def _cmd_clean(args: argparse.Namespace) -> int:
    import shutil

    from carsam.record import INTERRUPTED, list_records

    stale = [rec["run_id"] for rec in list_records(args.runs) if rec.get("status") == INTERRUPTED and rec.get("run_id")]
    for run_id in stale:
        folder = Path(args.runs) / str(run_id)
        if folder.resolve().parent != Path(args.runs).resolve():  # a run id never leaves the runs folder
            raise ConfigError(f"refusing to remove {folder}: not a folder directly under {args.runs}")
        print(f"{'would remove' if args.dry_run else 'removing'} {folder}")
        if not args.dry_run:
            shutil.rmtree(folder)
    if not stale:
        print(f"no interrupted runs under {args.runs}")
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from carsam.report.dashboard import build_dashboard, make_server

    if not args.serve:
        print(f"dashboard: {build_dashboard(args.runs, args.out)}")
        return 0
    if args.host not in LOOPBACK_HOSTS:
        if not args.allow_remote:
            raise ConfigError(f"--host {args.host} would serve every run to the network without authentication; "
                              "pass --allow-remote to do so, or keep the default 127.0.0.1")
        print(f"carsam: warning: serving {args.runs} to the network on {args.host}, without authentication",
              file=sys.stderr)
    server = make_server(args.runs, args.host, args.port)
    # after bind, server_address is getsockname()'s: an AF_INET(6) host is a str (typeshed also allows bytes)
    host, port = cast("tuple[str, int]", server.server_address[:2])
    print(f"dashboard of {args.runs} at http://{host}:{port}/ (rebuilt on each load; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from carsam.config import MODEL_TYPES, resolve
    from carsam.stats import measure_statistics

    if args.random_init and args.random_init not in MODEL_TYPES:
        raise ConfigError(f"--random-init must be one of {MODEL_TYPES}, got '{args.random_init}'")
    config = resolve(args.experiment, args.overrides)
    out = args.out or str(Path(config.runs_dir) / "stats" / (args.random_init or config.model.type))
    paths = measure_statistics(config, out, images=args.images, random_init=args.random_init)
    print(Path(paths[1]).read_text())  # statistics.md
    print(f"wrote {', '.join(p.name for p in paths)} to {out}", file=sys.stderr)
    return 0


def _cmd_testbed_data(args: argparse.Namespace) -> int:
    from carsam.data.synthetic import SyntheticSpec, dataset_dir, ensure_dataset

    spec = SyntheticSpec.for_family(args.family, args.seed)
    root = ensure_dataset(spec, dataset_dir(args.root, spec.seed, spec.family), tuple(args.splits))
    print(f"synthetic dataset ({spec.family}, seed {spec.seed}, splits {', '.join(args.splits)}) in {root}")
    return 0


def _recipe_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs of `TrainSpec` fields, each VALUE parsed by the field's default's type."""
    import dataclasses

    from carsam.testbed.train import TrainSpec

    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TrainSpec)}
    recipe: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in defaults or key == "seed":
            valid = sorted(set(defaults) - {"seed"})
            raise ConfigError(f"--train takes KEY=VALUE with KEY one of {valid}, got '{pair}'")
        kind = type(defaults[key])  # str, int or float
        try:
            recipe[key] = kind(text)
        except ValueError as err:
            raise ConfigError(f"--train {key} needs a {kind.__name__}, got '{text}'") from err
    try:
        TrainSpec(**recipe)  # range checks before any data is generated
    except ValueError as err:
        raise ConfigError(f"--train: {err}") from err
    return recipe


def _cmd_testbed_build(args: argparse.Namespace) -> int:
    from carsam.testbed.build import build_testbed
    from carsam.testbed.train import TrainingStateError

    recipe = _recipe_overrides(args.train)
    try:
        card = build_testbed(data_root=args.root, seed=args.seed, steps=args.steps, out_dir=args.out, recipe=recipe,
                             family=args.family, architecture=args.arch)
    except TrainingStateError as err:  # OUT/train_state.pt was saved by another recipe
        raise ConfigError(str(err)) from err
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


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="re-evaluate the quantized model a run saved, on other data or prompts",
                       description="Load RUN_DIR's saved model (output.save_model) and evaluate it with RUN_DIR's "
                                   "config, data.* (and device, runs_dir, diagnostics, ...) overridden; writes a "
                                   "new run record naming the source run. The method is not run again.")
    p.add_argument("run_dir", help="a run folder with model.safetensors and quantizers.json")
    p.add_argument("overrides", nargs="*", help="e.g. data.prompt_source=gt_boxes data.synthetic_seed=1")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_eval)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's saved model as a packed low-bit artifact or ONNX Q/DQ graphs",
                       description="safetensors: RUN_DIR's saved quantized model as integer weight codes (two 4-bit "
                                   "codes per byte), scales and zero points, activation qparams, FP parts as fp16, "
                                   "with a JSON header (carsam.export.packed). onnx: decoder.onnx (prompt encoder + "
                                   "mask decoder, image embeddings as input) and encoder.onnx, opset 21 with int4 "
                                   "Q/DQ nodes (carsam.export.onnx_graph).")
    p.add_argument("run_dir", help="a run folder with model.safetensors and quantizers.json")
    p.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors", help="the artifact's format")
    p.add_argument("--out", default="", help=f"output file (default: RUN_DIR/{PACKED_FILE}) or, for onnx, folder "
                                             f"(default: RUN_DIR/{ONNX_FOLDER})")
    p.set_defaults(func=_cmd_export)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="an Optuna study over a search space file; each trial is a run record",
                       description="Run (or resume) an Optuna study defined by a search-space Python file. "
                       "Several processes (--workers, or several commands on one --storage) share a study; "
                       "a worker killed mid-trial is detected by its missing heartbeat and its trial retried.")
    p.add_argument("space", help="search space file (e.g. sweeps/rtn_bits.py)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every trial")
    p.add_argument("--trials", type=_positive_int, default=9, help="the study's planned number of completed "
                   "trials, at most a grid's size (default 9); a rerun runs only what is missing")
    p.add_argument("--storage", default=None, help="Optuna storage URL (sqlite:///F, postgresql+psycopg2://...) "
                   "or journal:FILE (default sqlite:///RUNS/optuna.db; journal:RUNS/optuna.journal with --workers > 1)")
    p.add_argument("--study", default=None, help="study name (default: the space file's name)")
    p.add_argument("--runs", default="runs", help="runs folder (default runs)")
    p.add_argument("--workers", type=_positive_int, default=1, help="worker processes on the study (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (worker i uses SEED+i; default 0)")
    p.add_argument("--heartbeat", type=_positive_int, default=None, help="seconds between a running trial's "
                   "heartbeats; one silent for twice this is failed and retried "
                        "(default $CARSAM_SWEEP_HEARTBEAT or 60)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_sweep)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="ablation tables (Markdown, LaTeX, CSV) and figures from all run records",
                       description="Read runs/*/record.json into one long table and write the ablation tables "
                       "(methods x bits, MAC x JCAR, MAC readings, JCAR readings; mean ± std over seeds) as "
                       "Markdown, LaTeX and CSV, print the Markdown; --figures adds PNGs from diagnostics.parquet.")
    p.add_argument("--runs", default="runs", help="runs folder (default runs)")
    p.add_argument("--out", default=None, help="output folder (default RUNS/report)")
    p.add_argument("--figures", action="store_true", help="also write PNG figures to OUT/figures (attention "
                   "entropy, token->image mask mass, attention maps, reconstruction loss curves)")
    p.add_argument("--status", action="store_true", help="only list every run with its status (a run killed "
                   "without a word shows as interrupted, with when it was last alive)")
    p.set_defaults(func=_cmd_report)


def _add_clean(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clean", help="remove the folders of interrupted runs (only with --stale)",
                       description="Remove the run folders whose status is interrupted: stopped by Ctrl-C or "
                       "SIGTERM, or killed without a word (no heartbeat for a while, or the process gone). "
                       "Completed and failed runs are never touched.")
    p.add_argument("--runs", default="runs", help="runs folder (default runs)")
    p.add_argument("--stale", action="store_true", required=True, help="remove interrupted runs (required: "
                   "nothing is removed without it)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.set_defaults(func=_cmd_clean)


def _add_dashboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="an offline HTML page: runs table, attention entropy, loss curves",
                       description="Build an offline HTML page (no CDN) from runs/*/record.json and "
                       "diagnostics.parquet, or serve it over HTTP.")
    p.add_argument("--runs", default="runs", help="runs folder (default runs)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, help="output HTML file (default RUNS/dashboard.html)")
    where.add_argument("--serve", action="store_true", help="serve the page over HTTP instead of writing it")
    p.add_argument("--host", default="127.0.0.1", help="address to bind with --serve (default 127.0.0.1; another "
                   "address needs --allow-remote)")
    p.add_argument("--port", type=_port, default=8765, help="port with --serve (default 8765; 0 picks a free one)")
    p.add_argument("--allow-remote", action="store_true", help="allow a --host other than loopback: every run is "
                   "then served to the network, without authentication")
    p.set_defaults(func=_cmd_dashboard)


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="FP activation statistics of a SAM (decoder attention ranges, 4-bit "
                       "probability shares, BIG's bimodality, encoder outliers)",
                       description="Run the FP model over a few val images and write RUNS/stats/<model>/"
                       "statistics.{md,parquet,png,json}: per decoder attention the ranges and absmax/rms of its "
                       "inputs and of Q, K, V, the share of probabilities below one 4-bit step, the keys' "
                       "per-channel bimodality; per encoder block the per-channel outlier ratios.")
    p.add_argument("experiment", help="experiment YAML for the model and data (e.g. experiments/fp.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.prompt_source=gt_boxes")
    p.add_argument("--images", type=_positive_int, default=20, help="val images to pass (default 20)")
    p.add_argument("--random-init", default=None, metavar="TYPE", help="measure a random initialisation of TYPE "
                   "(testbed, vit_b, vit_l, vit_h; seeded by the config's seed) instead of the config's model")
    p.add_argument("--out", default=None, help="output folder (default RUNS/stats/<model type>)")
    p.set_defaults(func=_cmd_stats)


def _add_testbed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("testbed", help="generate the synthetic dataset or train the testbed SAM",
                       description="The embedded default: a small SAM trained on synthetic COCO-format data.")
    tsub = p.add_subparsers(dest="testbed_command", required=True, metavar="{data,build}")
    d = tsub.add_parser("data", help="generate the synthetic dataset (deterministic by seed)",
                        description="Write images, instances_<split>.json and prompts_<split>.json.")
    d.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    d.add_argument("--root", default="data", help="parent folder (default data); writes ROOT/testbed-seedN "
                   "(ROOT/testbed-FAMILY-seedN for a family other than shapes)")
    d.add_argument("--family", default="shapes", choices=sorted(SYNTHETIC_FAMILIES),
                   help="shape family (default shapes, the testbed's)")
    d.add_argument("--splits", nargs="+", default=["train", "calib", "val"], choices=["train", "calib", "val"])
    d.set_defaults(func=_cmd_testbed_data)
    b = tsub.add_parser("build", help="generate the data and train the testbed SAM (about an hour on 2 cores)",
                        description="Generate the dataset, train the testbed, save the fp16 checkpoint and a JSON "
                        "card with its FP metrics and training provenance. The training state is saved in "
                        "OUT/train_state.pt as it goes; the same command resumes an interrupted build.")
    b.add_argument("--seed", type=int, default=0, help="dataset and training seed (default 0)")
    b.add_argument("--root", default="data", help="data parent folder (default data)")
    b.add_argument("--family", default="shapes", choices=sorted(SYNTHETIC_FAMILIES),
                   help="shape family of the training data (default shapes, the testbed's)")
    b.add_argument("--arch", default="sam", choices=("sam", "sam2"), help="testbed architecture: sam (default, "
                   "segment_anything classes) or sam2 (a small Hiera + SAM2's decoder, docs/sam2.md)")
    b.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: the recipe's)")
    b.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE", help="training recipe fields (TrainSpec), "
                   "e.g. decay_scope=matrices embedding_lr_scale=10 token_init_std=4 (default: v1's recipe)")
    b.add_argument("--out", default="build/testbed", help="output folder (default build/testbed; the shipped "
                   "pair is carsam/testbed/testbed_sam.pth + testbed.json)")
    b.set_defaults(func=_cmd_testbed_build)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carsam", description="4-bit PTQ of Segment Anything: CAR-SAM and "
                                     "the baselines it is compared with, on SAM or the embedded testbed.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{run,eval,export,sweep,report,dashboard,stats,testbed,clean}")
    for add in (_add_run, _add_eval, _add_export, _add_sweep, _add_report, _add_dashboard, _add_stats, _add_testbed,
                _add_clean):
        add(sub)
    return parser


def _sigterm_as_interrupt(signum: int, _frame: object) -> None:
    """SIGTERM ends a command as Ctrl-C does: the run records `interrupted` and the exit is 130 + 2 = 143."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with `key=value` overrides accepted anywhere after the subcommand (argparse alone
    takes them only before the first option)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        return _dispatch(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the subcommand; a user error is one line on stderr and exit 2."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("PIL").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        print(f"carsam: interrupted ({str(err) or 'SIGINT'})", file=sys.stderr)
        return 143 if str(err) == "SIGTERM" else 130
    except USER_ERRORS as err:
        if args.verbose:
            logging.exception("user error")
        print(f"carsam: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

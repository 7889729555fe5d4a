"""`tensormask-ray runs compare SWEEP` (table + PNG), `tensormask-ray runs best SWEEP` and
`tensormask-ray runs register SWEEP|RUN --name NAME` (the best checkpoint of a sweep or of a
training run as a new version of a registered MLflow model)."""

from __future__ import annotations

import argparse

from ..errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="runs_command", metavar="SUBCOMMAND", required=True)
    c = sub.add_parser(
        "compare",
        help="the sweep's trials as a table (best first) and a PNG of the metric per parameter",
    )
    c.add_argument("sweep", metavar="SWEEP")
    c.add_argument(
        "--storage-path",
        default="runs",
        metavar="URI",
        help="where the sweep lives (default ./runs)",
    )
    c.add_argument("--out", metavar="PNG", help="the plot (default: <sweep dir>/compare.png)")
    b = sub.add_parser("best", help="the best trial's checkpoint path and config")
    b.add_argument("sweep", metavar="SWEEP")
    b.add_argument(
        "--storage-path",
        default="runs",
        metavar="URI",
        help="where the sweep lives (default ./runs)",
    )
    r = sub.add_parser(
        "register",
        help="register the best checkpoint of a sweep or a training run as an MLflow model version",
    )
    r.add_argument(
        "source",
        metavar="SWEEP|RUN",
        help="a sweep's name (its best trial), or the MLflow run id of a training run or trial",
    )
    r.add_argument(
        "--name", required=True, help="the registered model's name (a new version is added)"
    )
    r.add_argument(
        "--storage-path",
        default="runs",
        metavar="URI",
        help="where the sweep lives (default ./runs)",
    )
    r.add_argument(
        "--mlflow-uri",
        default="",
        metavar="URI",
        help="MLflow store (default: the sweep's, else MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )


def register(args: argparse.Namespace) -> int:
    """SWEEP: its best trial's checkpoint, in the trial's run; RUN: the run's best checkpoint."""
    from ..evaluation.mlflow_model import LOADER_MODULE
    from ..evaluation.runs import checkpoint_of_run
    from ..tracking import RunLogger, get_run, resolve_tracking_uri
    from ..train import storage
    from ..train.trainer import log_checkpoint_model
    from .results import SWEEP_FILE, load_sweep, trial_rows

    if storage.exists(storage.join(storage.absolute(args.storage_path), args.source, SWEEP_FILE)):
        _, record, spec = load_sweep(args.source, args.storage_path)
        uri = resolve_tracking_uri(args.mlflow_uri or record["mlflow_uri"])
        rows = trial_rows(args.source, args.storage_path)
        if (
            not rows
            or rows[0]["metric"] is None
            or not rows[0]["checkpoint"]
            or not rows[0]["mlflow_run_id"]
        ):
            raise UserError(
                f"sweep '{args.source}' has no trial with a checkpoint scored on {spec.metric}"
            )
        run_id, checkpoint = rows[0]["mlflow_run_id"], rows[0]["checkpoint"]
        what = f"sweep '{args.source}', best trial {rows[0]['name']} ({rows[0]['trial_id']})"
    else:
        uri = resolve_tracking_uri(args.mlflow_uri)
        try:
            get_run(uri, args.source)
        except UserError as e:
            raise UserError(
                f"{args.source} is neither a sweep in {storage.absolute(args.storage_path)} nor an MLflow run in {uri}"
            ) from e
        run_id, checkpoint = args.source, checkpoint_of_run(args.source, uri)
        what = f"run {run_id}"
    model_id, version = log_checkpoint_model(
        RunLogger(uri, run_id), checkpoint, args.name, model_loader=LOADER_MODULE
    )
    print(f"registered {what}: checkpoint {checkpoint}")
    print(f"model: models:/{args.name}/{version} (logged model {model_id}, {uri})")
    print(
        f"evaluate it: tensormask-ray evaluate --model models:/{args.name}/{version} --mlflow-uri {uri} --shards DIR --out DIR"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from .results import format_table, load_sweep, plot_metric, trial_rows

    if args.runs_command == "register":
        return register(args)

    sweep_dir, _, spec = load_sweep(args.sweep, args.storage_path)
    rows = trial_rows(args.sweep, args.storage_path)
    if args.runs_command == "compare":
        print(format_table(rows, spec))
        out = plot_metric(rows, spec, args.out or f"{sweep_dir}/compare.png")
        print(f"wrote {out}")
        return 0
    if not rows or rows[0]["metric"] is None or not rows[0]["checkpoint"]:
        raise UserError(
            f"sweep '{args.sweep}' has no trial with a checkpoint scored on {spec.metric}"
        )
    best = rows[0]
    from ..modeling.checkpoint_file import read_state

    state = read_state(best["checkpoint"])
    print(
        f"best trial {best['trial_id']}: {spec.metric} {best['metric']:.6g} at iteration {state.get('iteration')}"
    )
    print(f"checkpoint: {best['checkpoint']}")
    print(f"mlflow run: {best['mlflow_run_id']}")
    print("swept values: " + ", ".join(f"{k}={v}" for k, v in best["params"].items()))
    print("config:")
    from ..config import from_dict

    print(
        from_dict(state["config"]).to_yaml()
        if isinstance(state.get("config"), dict)
        else state.get("config")
    )
    return 0

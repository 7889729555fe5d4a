"""`tensormask-ray runs compare SWEEP` (table + PNG), `tensormask-ray runs best SWEEP` and
`tensormask-ray runs register SWEEP|RUN --name NAME` (the best checkpoint of a sweep or of a
training run as a new version of a registered MLflow model)."""

from __future__ import annotations

import argparse


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


def run(args: argparse.Namespace) -> int:
    from .. import api

    if args.runs_command == "register":
        result = api.register(
            args.source, args.name, storage_path=args.storage_path, mlflow_uri=args.mlflow_uri
        )
        print(f"registered {result.source}: checkpoint {result.checkpoint}")
        print(f"model: {result.model_uri} (logged model {result.model_id}, {result.mlflow_uri})")
        print(
            f"evaluate it: tensormask-ray evaluate --model {result.model_uri} --mlflow-uri {result.mlflow_uri} --shards DIR --out DIR"
        )
        return 0
    if args.runs_command == "compare":
        compared = api.compare(args.sweep, storage_path=args.storage_path, plot=args.out)
        print(compared.table)
        print(f"wrote {compared.plot}")
        return 0
    best = api.best_trial(args.sweep, storage_path=args.storage_path)
    print(
        f"best trial {best.trial_id}: {best.metric_name} {best.metric:.6g} at iteration {best.iteration}"
    )
    print(f"checkpoint: {best.checkpoint}")
    print(f"mlflow run: {best.mlflow_run_id}")
    print("swept values: " + ", ".join(f"{k}={v}" for k, v in best.params.items()))
    print("config:")
    print(best.config.to_yaml() if hasattr(best.config, "to_yaml") else best.config)
    return 0

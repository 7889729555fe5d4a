"""`tensormask-ray sweep SPEC.yaml [key=value ...]` and `tensormask-ray sweep --resume NAME`."""

from __future__ import annotations

import argparse

from ..console import add_address_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", metavar="SPEC.yaml", help="the sweep spec (see sweeps/)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="base-config overrides, e.g. data.train_shards=DIR (a searched key given here is pinned to that value)",
    )
    p.add_argument(
        "--resume",
        metavar="NAME",
        help="continue the interrupted sweep NAME (finished trials are kept)",
    )
    p.add_argument("--name", help="the sweep's name (default: the spec's `name`)")
    p.add_argument(
        "--storage-path",
        metavar="URI",
        help="where sweeps live (default: the base config's train.storage_path)",
    )
    p.add_argument(
        "--mlflow-uri",
        metavar="URI",
        help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    add_address_argument(p)


def run(args: argparse.Namespace) -> int:
    from ..api import sweep

    result = sweep(
        args.spec,
        args.overrides,
        name=args.name,
        resume=args.resume,
        storage_path=args.storage_path,
        mlflow_uri=args.mlflow_uri,
        address=args.address,
    )
    if result.interrupted:
        return 130
    return 1 if result.failed else 0

"""`tensormask-ray train --config FILE [key=value ...] [--num-workers N] [--use-gpu] [--address ADDR]
[--resume]`: argument parsing only; `tensormask_ray.api.train` validates (before any worker
starts) and runs, printing its progress."""

from __future__ import annotations

import argparse

from ..console import add_address_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted config overrides, e.g. model.window_sizes=[15,11]",
    )
    p.add_argument("--config", help="YAML config file (defaults to the built-in defaults)")
    p.add_argument(
        "--preset",
        help="named preset(s) applied before the file, e.g. cpu-small or table2c-bipyramid+1x",
    )
    p.add_argument("--num-workers", type=int, help="Ray Train workers (train.num_workers)")
    p.add_argument(
        "--use-gpu", action="store_true", help="one GPU per worker, NCCL (train.use_gpu)"
    )
    add_address_argument(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run named train.run_name from its latest checkpoint",
    )
    p.add_argument(
        "--mlflow-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)",
    )
    p.add_argument(
        "--storage-path",
        help="checkpoint storage: local folder, shared filesystem or object-store URI",
    )
    p.add_argument("--run-name", help="train.run_name")


def run(args: argparse.Namespace) -> int:
    from ..api import train

    result = train(
        args.config,
        preset=args.preset,
        overrides=args.overrides,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        storage_path=args.storage_path,
        name=args.run_name,
        resume=args.resume,
        address=args.address,
        mlflow_uri=args.mlflow_uri,
    )
    return 1 if result.error else 0

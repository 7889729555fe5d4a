"""`tensormask-ray train --config FILE [key=value ...] [--num-workers N] [--use-gpu] [--address ADDR]
[--resume]`: parse, validate (before any worker starts), run."""

from __future__ import annotations

import argparse

from ..config import load_config


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
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
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


def config_from_args(args: argparse.Namespace):
    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.append(f"train.num_workers={args.num_workers}")
    if args.use_gpu:
        overrides.append("train.use_gpu=true")
    if args.storage_path:
        overrides.append(f"train.storage_path={args.storage_path}")
    if args.run_name:
        overrides.append(f"train.run_name={args.run_name}")
    return load_config(args.config, overrides, args.preset)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.mlflow_model import LOADER_MODULE
    from ..evaluation.validation import validate_on_shards
    from .trainer import run_training

    cfg = config_from_args(args)
    outcome = run_training(
        cfg,
        resume=args.resume,
        address=args.address,
        mlflow_uri=args.mlflow_uri,
        validation=validate_on_shards,
        model_loader=LOADER_MODULE,
    )
    return 1 if outcome.error else 0

"""The `tensormask-ray` front door: argument parsing and dispatch only, no logic of its own.

Each command lives with the code it drives (`data/cli.py`, `train/cli.py`, ...) and exposes
`add_arguments(parser)` and `run(args) -> int`. Command modules are imported only when used, so
`tensormask-ray --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .console import VERBOSE_ENV, routed
from .errors import UserError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "tensormask_ray.demo",
        "run the whole pipeline on data it makes itself (local Ray, local MLflow)",
    ),
    "data": ("tensormask_ray.data.cli", "make datasets and write Parquet shards"),
    "train": ("tensormask_ray.train.cli", "distributed training with Ray Train"),
    "sweep": ("tensormask_ray.tune.cli", "hyper-parameter sweeps with Ray Tune"),
    "runs": ("tensormask_ray.tune.runs_cli", "compare the trials of a sweep, find the best"),
    "evaluate": ("tensormask_ray.evaluation.cli", "COCO mask/box AP, test-dev result files"),
    "predict": (
        "tensormask_ray.evaluation.predict_cli",
        "masks drawn over images, detections as JSON",
    ),
    "convert": (
        "tensormask_ray.convert.cli",
        "checkpoints of other codebases (Detectron2) -> ours",
    ),
    "submit": ("tensormask_ray.cluster.cli", "submit train/sweep/evaluate to a Ray cluster"),
    "jobs": ("tensormask_ray.cluster.jobs_cli", "list, follow and stop Ray jobs"),
}


def _load(name: str):
    module_name, _ = COMMANDS[name]
    return importlib.import_module(module_name)


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensormask-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose",
        action="store_true",
        help=f"show the logs of Ray and other libraries on the terminal too (also {VERBOSE_ENV}=1); they always go to the log file",
    )
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if name == command:
            _load(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # The demo keeps its log beside everything else it writes.
    log_dir = Path(args.workdir) / "logs" if args.command == "demo" else None
    with routed(args.command, verbose=args.verbose, log_dir=log_dir):
        try:
            return int(_load(args.command).run(args) or 0)
        except UserError as e:
            print(f"tensormask-ray {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"tensormask-ray {args.command}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())

"""`tensormask-ray predict IMAGE_OR_DIR... --checkpoint PATH --out DIR`: each image with its
instances drawn over it (mask in its own colour, contour, "class score" label) as
DIR/<image name>.png, and every detection in DIR/detections.json.

Images run in this process by default, or on Ray Data actors with --num-actors N (the same per
image work as `evaluate`). An image that cannot be decoded is reported by name and skipped, or
stops the run with --strict. --score-thresh (default 0.5) is both the detection threshold and
the drawing threshold, so the JSON holds exactly what the pictures show.
"""

from __future__ import annotations

import argparse
import sys

from .options import (
    add_execution_arguments,
    add_model_arguments,
    add_test_time_arguments,
    execution,
    inference_options,
)
from .predict import DEFAULT_SCORE_THRESH, PredictResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images"
    )
    add_model_arguments(parser)
    add_test_time_arguments(
        parser,
        DEFAULT_SCORE_THRESH,
        f"keep and draw detections scoring at least this (default {DEFAULT_SCORE_THRESH})",
    )
    add_execution_arguments(parser, default_actors=0)
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--alpha", type=float, default=0.5, help="mask opacity (default 0.5)")


def run(args: argparse.Namespace) -> int:
    from ..api import predict

    result = predict(
        args.inputs,
        args.checkpoint,
        output_dir=args.out,
        mlflow_run=args.mlflow_run,
        best_of=args.best_of,
        sweep_storage=args.sweep_storage,
        model=args.model,
        mlflow_uri=args.mlflow_uri,
        inference=inference_options(args),
        execution=execution(args),
        alpha=args.alpha,
    )
    print_result(result)
    return 0 if result.overlays else 1


def print_result(result: PredictResult) -> None:
    """What `predict` prints: the overlays and detections written, the images skipped."""
    print(
        f"wrote {len(result.overlays)} overlays to {result.output_dir} and "
        f"{result.num_detections} detections to {result.detections_file}"
    )
    if result.skipped:
        print(
            f"[predict] {len(result.skipped)} of {len(result.detections)} images could not be decoded (listed above)",
            file=sys.stderr,
        )

"""`tensormask-ray evaluate`: COCO mask and box AP of a checkpoint on a split with ground truth,
or the result files of the COCO evaluation server for test-dev (no ground truth).

    evaluate --checkpoint PATH --shards DIR --out DIR
    evaluate --checkpoint PATH --coco-json instances.json --images-dir DIR --out DIR
    evaluate --checkpoint PATH --split test-dev --image-info image_info_test-dev2017.json
             (--images-dir DIR | --shards DIR) --out DIR [--name NAME]

Writes into --out: predictions.jsonl (the streaming log; a rerun resumes from it), and then
detections.json + metrics.json (with ground truth) or detections_test-dev2017_<name>_results.json
and its .zip (test-dev). Metrics are printed as a table and logged as an MLflow evaluation run
(`eval <checkpoint> <split>`) nested under the checkpoint's training run (see runs.py).

    evaluate --model models:/NAME/VERSION --shards DIR --out DIR     # a registered model
"""

from __future__ import annotations

import argparse

from .evaluate import SPLITS, EvalResult
from .options import (
    add_execution_arguments,
    add_model_arguments,
    add_test_time_arguments,
    execution,
    inference_options,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    g = parser.add_argument_group("data")
    g.add_argument(
        "--split",
        choices=SPLITS,
        default="val",
        help="val: any split with ground truth, AP computed; test-dev: result files for the "
        "COCO server, no metric (default val)",
    )
    g.add_argument("--shards", metavar="DIR", help="Parquet shards folder (`data prepare`)")
    g.add_argument(
        "--coco-json",
        metavar="FILE",
        help="ground truth as a COCO instances JSON (with --images-dir)",
    )
    g.add_argument("--images-dir", metavar="DIR", help="folder of the JSON's file_name entries")
    g.add_argument(
        "--image-info",
        metavar="FILE",
        help="test-dev: the image-info JSON (image_info_test-dev2017.json); every image listed "
        "must be processed",
    )
    g.add_argument(
        "--name",
        default="tensormask",
        help="test-dev: the <name> in detections_test-dev2017_<name>_results.json",
    )
    g.add_argument(
        "--max-images", type=int, default=0, metavar="N", help="val: the first N images only"
    )
    add_test_time_arguments(parser, None, "score threshold of the detections (paper: 0.05)")
    add_execution_arguments(parser, default_actors=1)
    o = parser.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="DIR", help="output folder")
    o.add_argument(
        "--overwrite",
        action="store_true",
        help="start again instead of resuming from the predictions already in --out",
    )
    o.add_argument("--no-mlflow", action="store_true", help="do not log the metrics to MLflow")
    o.add_argument(
        "--window-masks",
        action="store_true",
        help="also score the mask head alone: the IoU of the masks it predicts at each "
        "instance's positive windows (evaluation/window_masks.py; needs --shards)",
    )
    o.add_argument(
        "--metric-prefix", default="eval", help="MLflow metric names: <prefix>/segm/AP, ..."
    )


def run(args: argparse.Namespace) -> int:
    from ..api import evaluate

    result = evaluate(
        args.checkpoint,
        output_dir=args.out,
        mlflow_run=args.mlflow_run,
        best_of=args.best_of,
        sweep_storage=args.sweep_storage,
        model=args.model,
        split=args.split,
        shards=args.shards,
        coco_json=args.coco_json,
        images_dir=args.images_dir,
        image_info=args.image_info,
        name=args.name,
        max_images=args.max_images,
        inference=inference_options(args),
        execution=execution(args),
        overwrite=args.overwrite,
        log_to_mlflow=not args.no_mlflow,
        mlflow_uri=args.mlflow_uri,
        window_masks=args.window_masks,
        metric_prefix=args.metric_prefix,
    )
    print_result(result)
    return 0


def print_result(result: EvalResult) -> None:
    """What `evaluate` prints: the files written, the AP table, the instances found, the
    evaluation run."""
    from .coco import format_metrics_table
    from .found import format_found

    if result.split == "test-dev":
        json_path, zip_path = result.files
        print(f"wrote {json_path}\nwrote {zip_path} (upload this to the COCO evaluation server)")
    else:
        detections_path, metrics_path = result.files
        print(f"COCO AP (%) on {result.num_images} images of {result.data}:")
        print(format_metrics_table(result.metrics))
        print(format_found(result.instances_found))
        if result.window_masks is not None:
            from .window_masks import format_window_mask_table

            print(
                "mask IoU (%) at the ground-truth instances' positive windows (the mask head alone):"
            )
            print(format_window_mask_table(result.window_masks))
        print(f"wrote {detections_path} ({result.num_detections} detections) and {metrics_path}")
    if result.mlflow_run_id:
        print(f"logged the evaluation run {result.mlflow_run_id} to MLflow ({result.mlflow_uri})")

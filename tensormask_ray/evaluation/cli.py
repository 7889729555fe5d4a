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
import json
import os
import sys
from pathlib import Path

from ..errors import UserError
from .options import (
    Progress,
    add_execution_arguments,
    add_model_arguments,
    add_test_time_arguments,
    check_execution,
    inference_overrides,
    load_model,
    report_failures,
)

SPLITS = ("val", "test-dev")
MAX_LOGGED_DETECTIONS_BYTES = 64 << 20  # larger detections.json files stay in --out only


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


def _check_data_arguments(args: argparse.Namespace) -> None:
    if args.split == "test-dev":
        if not args.image_info:
            raise UserError(
                "--split test-dev needs --image-info FILE (image_info_test-dev2017.json)"
            )
        if bool(args.shards) == bool(args.images_dir):
            raise UserError("--split test-dev: give the images as --images-dir DIR or --shards DIR")
        if args.coco_json or args.max_images:
            raise UserError(
                "--split test-dev takes no --coco-json or --max-images: every image counts"
            )
        if args.window_masks:
            raise UserError("--window-masks needs ground truth: not with --split test-dev")
    else:
        if args.image_info:
            raise UserError(
                "--image-info is for --split test-dev; ground truth is --coco-json or --shards"
            )
        if not args.shards and not (args.coco_json and args.images_dir):
            raise UserError(
                "give the data as --shards DIR, or --coco-json FILE with --images-dir DIR"
            )
        if args.images_dir and not args.coco_json:
            raise UserError("--images-dir needs --coco-json (which images, and their ground truth)")
        if args.shards and args.images_dir:
            raise UserError("give the images as --shards or as --images-dir, not both")
        if args.max_images < 0:
            raise UserError(f"--max-images {args.max_images}: must be 0 (all) or more")
        if args.window_masks and not args.shards:
            raise UserError(
                "--window-masks needs --shards DIR (the ground-truth masks at the model's input)"
            )
    if args.metric_prefix.strip("/") != args.metric_prefix or not args.metric_prefix:
        raise UserError(
            f"--metric-prefix {args.metric_prefix!r}: a non-empty name without leading or trailing '/'"
        )


def _category_ids(
    categories: list[dict], dataset_categories: list[dict], num_classes: int, where: str
) -> list[int]:
    """COCO id of each class index: the checkpoint's categories (those it was trained with), or
    for a checkpoint without them the data's in id order; checked against the data's."""
    from ..data.manifest import CategoryMap

    data = CategoryMap.from_categories(dataset_categories)
    model = CategoryMap.of_model(categories, num_classes, "checkpoint") if categories else data
    if model.num_classes != num_classes:
        raise UserError(
            f"the checkpoint's model has {num_classes} classes but {where} has {data.num_classes} categories"
        )
    ids = list(model.ids)
    unknown = [i for i in ids if i not in data]
    if unknown:
        raise UserError(
            f"category ids {unknown} of the checkpoint are not among the categories of {where}"
        )
    return ids


def run(args: argparse.Namespace) -> int:
    from ..data.manifest import dataset_summary
    from ..tracking import resolve_tracking_uri
    from .batch_inference import run_inference
    from .coco import evaluate_coco, format_metrics_table
    from .found import format_found, instances_found
    from .ground_truth import coco_gt_from_json, coco_gt_from_shards
    from .image_sources import FileSource, ShardSource
    from .predictor import ModelSpec
    from .result_log import LOG_NAME, ResultLog, log_header
    from .runs import checkpoint_iteration, log_evaluation_run
    from .testdev import results_file_name, write_test_dev_results

    _check_data_arguments(args)
    check_execution(args)
    overrides = inference_overrides(args)
    if args.split == "test-dev":
        results_file_name(args.name)  # a bad --name fails now, not after inference

    # The model: loaded here once, so that a checkpoint not matching its config fails at once.
    ref, model, cfg, categories = load_model(args, overrides)
    local = args.num_actors == 0
    print(f"[evaluate] model {ref.path} ({ref.how})", file=sys.stderr)

    # The data: ground truth (or the image-info file) and where the images are.
    if args.split == "test-dev":
        truth, where = coco_gt_from_json(args.image_info), args.image_info
    elif args.coco_json:
        truth, where = coco_gt_from_json(args.coco_json), args.coco_json
    else:
        truth, where = coco_gt_from_shards(args.shards), args.shards
    source = (
        ShardSource(args.shards) if args.shards else FileSource.from_coco(truth, args.images_dir)
    )
    image_ids = source.image_ids()
    listed = set(truth.getImgIds())
    strangers = set(image_ids) - listed
    if strangers:
        raise UserError(
            f"{len(strangers)} images of {source.describe()} are not in {where}: {sorted(strangers)[:5]}"
        )
    if args.split == "test-dev" and listed - set(image_ids):
        missing = sorted(listed - set(image_ids))
        raise UserError(
            f"{len(missing)} images of {where} are not in {source.describe()}: {missing[:5]}"
        )
    if args.max_images:
        image_ids = image_ids[: args.max_images]
    category_ids = _category_ids(
        categories, truth.dataset["categories"], cfg.model.num_classes, where
    )

    # Inference, streamed into the log (resumed if the log is there).
    spec = ModelSpec(ref.path, tuple(category_ids), tuple(overrides.items()), args.device)
    out = Path(args.out)
    with ResultLog(out / LOG_NAME, log_header(spec, cfg, source.describe()), args.overwrite) as log:
        done_before = len(log.done_ids & set(image_ids))
        if done_before:
            print(
                f"[evaluate] resuming: {done_before} of {len(image_ids)} images already done",
                file=sys.stderr,
            )
        outcome = run_inference(
            source, spec, log, image_ids,
            num_actors=args.num_actors, batch_size=args.batch_size, cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=1.0 if args.device == "cuda" else 0.0, strict=args.strict,
            address=args.address, on_record=Progress("evaluate", len(image_ids), done_before),
            loaded=(model, cfg) if local else None,
        )  # fmt: skip
        window_masks = None
        if args.window_masks:
            from .window_masks import evaluate_window_masks, format_window_mask_table

            window_masks = evaluate_window_masks(model, args.shards, cfg, args.max_images)
        del model
        report_failures("evaluate", outcome.failures)
        if not outcome.done_ids:
            raise UserError(f"no image of {source.describe()} could be processed")
        done = sorted(outcome.done_ids)

        uri = resolve_tracking_uri(args.mlflow_uri or cfg.tracking.mlflow_uri)
        # A store named by the user (or the checkpoint's config) gets a run even without a
        # training run to nest it under; the default ./mlflow.db does not.
        standalone = bool(
            args.mlflow_uri or cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
        )
        split = _split_name(args)
        params = {
            "checkpoint": ref.path,
            "model": args.model or "",
            "split": args.split,
            "data": source.describe(),
            "max_images": args.max_images,
            **{f"inference.{k}": v for k, v in vars(cfg.inference).items()},
            "input.min_size_test": cfg.input.min_size_test,
            "input.max_size_test": cfg.input.max_size_test,
        }
        dataset = dataset_summary(args.shards) if args.shards else None
        if args.split == "test-dev":
            json_path, zip_path = write_test_dev_results(
                log.iter_results(done), truth, out, args.name, processed_image_ids=done
            )
            print(
                f"wrote {json_path}\nwrote {zip_path} (upload this to the COCO evaluation server)"
            )
            if not args.no_mlflow:
                run_id = log_evaluation_run(
                    ref, uri, cfg.tracking.experiment, split, {f"{args.metric_prefix}/num_images": len(done)},
                    checkpoint_iteration(ref.path) or 0, params, [zip_path], dataset, standalone,
                )  # fmt: skip
                if run_id:
                    print(f"logged the evaluation run {run_id} to MLflow ({uri})")
            return 0

        results = list(log.iter_results(done))
    detections_path = _write_json(out / "detections.json", results)
    metrics = evaluate_coco(truth, results, image_ids=done)
    found = instances_found(truth, results, image_ids=done)
    table = format_metrics_table(metrics)
    iteration = checkpoint_iteration(ref.path)
    summary = {
        "metrics": metrics,
        "checkpoint": ref.path,
        "iteration": iteration,
        "data": source.describe(),
        "ground_truth": str(where),
        "num_images": len(done),
        "num_detections": len(results),
        "skipped_images": [
            {"image_id": i, "file_name": name, "error": error}
            for i, (name, error) in sorted(outcome.failures.items())
        ],
        "inference": {
            **vars(cfg.inference),
            "min_size_test": cfg.input.min_size_test,
            "max_size_test": cfg.input.max_size_test,
        },
        "seconds": round(outcome.seconds, 3),
        "images_per_second": round(outcome.images_per_second, 3),
        "mlflow_run_id": None,
    }
    summary["instances_found"] = {k: v for k, v in found.items() if k != "per_image"}
    if window_masks is not None:
        summary["window_masks"] = window_masks
    metrics_path = out / "metrics.json"
    _write_json(metrics_path, summary)
    print(f"COCO AP (%) on {len(done)} images of {source.describe()}:")
    print(table)
    print(format_found(found))
    if window_masks is not None:
        print("mask IoU (%) at the ground-truth instances' positive windows (the mask head alone):")
        print(format_window_mask_table(window_masks))
    print(f"wrote {detections_path} ({len(results)} detections) and {metrics_path}")
    if not args.no_mlflow:
        logged = {
            f"{args.metric_prefix}/{key}": value for key, value in metrics.items() if value >= 0
        }  # -1 (no ground truth of that size) is not a score
        logged[f"{args.metric_prefix}/num_images"] = len(done)
        logged[f"{args.metric_prefix}/instances_found"] = found["found"]
        for key, value in (window_masks or {}).items():
            if value >= 0:
                logged[f"{args.metric_prefix}/window_masks/{key}"] = value
        artifacts = [metrics_path]
        if detections_path.stat().st_size <= MAX_LOGGED_DETECTIONS_BYTES:
            artifacts.append(detections_path)
        else:
            print(
                f"[evaluate] {detections_path} is over {MAX_LOGGED_DETECTIONS_BYTES >> 20} MiB: not copied to MLflow",
                file=sys.stderr,
            )
        run_id = log_evaluation_run(
            ref,
            uri,
            cfg.tracking.experiment,
            split,
            logged,
            iteration or 0,
            params,
            artifacts,
            dataset,
            standalone,
        )
        if run_id:
            summary["mlflow_run_id"] = run_id
            summary["mlflow_parent_run_id"] = ref.mlflow_run_id
            _write_json(metrics_path, summary)
            print(f"logged the evaluation run {run_id} to MLflow ({uri})")
        else:
            print("[evaluate] not logged to MLflow: no training run of this checkpoint is known; "
                  "--mlflow-uri URI logs it as a run of its own", file=sys.stderr)  # fmt: skip
    return 0


def _split_name(args: argparse.Namespace) -> str:
    """The evaluated split as the evaluation run names it: test-dev, else the data's folder (or
    annotation file) name, e.g. val2017."""
    if args.split == "test-dev":
        return "test-dev"
    return Path(args.shards).resolve().name if args.shards else Path(args.coco_json).stem


def _write_json(path: Path, value) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(value, f)
    tmp.replace(path)
    return path

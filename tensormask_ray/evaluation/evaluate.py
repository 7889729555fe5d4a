"""The evaluate pipeline: a resolved checkpoint run over a split with ground truth (COCO mask and
box AP, instances found, optionally the mask head alone), or over test-dev (the result files of
the COCO evaluation server), streamed into a resumable log, written to the output folder and
logged as an MLflow evaluation run (runs.py). `tensormask_ray.api.evaluate` checks the arguments
and resolves the checkpoint, then calls `run_evaluation`; `tensormask-ray evaluate` prints the
result."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .options import Execution, Progress, load_model, report_failures

if TYPE_CHECKING:
    from .runs import CheckpointRef

SPLITS = ("val", "test-dev")
MAX_LOGGED_DETECTIONS_BYTES = 64 << 20  # larger detections.json files stay in the output only


@dataclass(frozen=True)
class EvalResult:
    """What an evaluation wrote and measured."""

    output_dir: Path
    checkpoint: str  # the checkpoint folder (or state.pt) evaluated
    split: str  # as the evaluation run names it: test-dev, or the data's folder name
    data: str  # the images evaluated, described
    num_images: int  # images processed
    num_detections: int
    metrics: dict[str, float] = field(default_factory=dict)  # segm/AP, bbox/AP50, ... (val)
    instances_found: dict[str, Any] | None = None  # found, instances, score_thresh, iou_thresh
    window_masks: dict[str, float] | None = None  # the mask head alone (window_masks=True)
    files: tuple[Path, ...] = ()  # every file written, in the order written
    skipped_images: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (name, why)
    mlflow_run_id: str | None = None  # the evaluation run, when logged
    mlflow_uri: str = ""


def check_data(
    split: str,
    shards: str | None,
    coco_json: str | None,
    images_dir: str | None,
    image_info: str | None,
    max_images: int,
    window_masks: bool,
    metric_prefix: str,
) -> None:
    """The data arguments of an evaluation, before anything is loaded."""
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: must be one of {', '.join(SPLITS)}")
    if split == "test-dev":
        if not image_info:
            raise UserError(
                "--split test-dev needs --image-info FILE (image_info_test-dev2017.json)"
            )
        if bool(shards) == bool(images_dir):
            raise UserError("--split test-dev: give the images as --images-dir DIR or --shards DIR")
        if coco_json or max_images:
            raise UserError(
                "--split test-dev takes no --coco-json or --max-images: every image counts"
            )
        if window_masks:
            raise UserError("--window-masks needs ground truth: not with --split test-dev")
    else:
        if image_info:
            raise UserError(
                "--image-info is for --split test-dev; ground truth is --coco-json or --shards"
            )
        if not shards and not (coco_json and images_dir):
            raise UserError(
                "give the data as --shards DIR, or --coco-json FILE with --images-dir DIR"
            )
        if images_dir and not coco_json:
            raise UserError("--images-dir needs --coco-json (which images, and their ground truth)")
        if shards and images_dir:
            raise UserError("give the images as --shards or as --images-dir, not both")
        if max_images < 0:
            raise UserError(f"--max-images {max_images}: must be 0 (all) or more")
        if window_masks and not shards:
            raise UserError(
                "--window-masks needs --shards DIR (the ground-truth masks at the model's input)"
            )
    if metric_prefix.strip("/") != metric_prefix or not metric_prefix:
        raise UserError(
            f"--metric-prefix {metric_prefix!r}: a non-empty name without leading or trailing '/'"
        )


def category_ids(
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


def split_name(split: str, shards: str | None, coco_json: str | None) -> str:
    """The evaluated split as the evaluation run names it: test-dev, else the data's folder (or
    annotation file) name, e.g. val2017."""
    if split == "test-dev":
        return "test-dev"
    return Path(shards).resolve().name if shards else Path(coco_json).stem


def run_evaluation(
    ref: CheckpointRef,
    output_dir: str | Path,
    overrides: dict[str, Any],
    execution: Execution,
    *,
    split: str = "val",
    shards: str | None = None,
    coco_json: str | None = None,
    images_dir: str | None = None,
    image_info: str | None = None,
    name: str = "tensormask",
    max_images: int = 0,
    overwrite: bool = False,
    log_to_mlflow: bool = True,
    mlflow_uri: str = "",
    window_masks: bool = False,
    metric_prefix: str = "eval",
    model_uri: str = "",
) -> EvalResult:
    """Evaluates the checkpoint `ref` (arguments checked by `check_data`, `execution.check()`
    and `InferenceOptions.overrides()`) and writes into `output_dir`: predictions.jsonl (the
    streaming log; a rerun resumes from it), then detections.json + metrics.json (with ground
    truth) or the test-dev results JSON and its zip. Progress and warnings go to stderr."""
    from ..data.manifest import dataset_summary
    from ..tracking import resolve_tracking_uri
    from .batch_inference import run_inference
    from .coco import evaluate_coco
    from .found import instances_found
    from .ground_truth import coco_gt_from_json, coco_gt_from_shards
    from .image_sources import FileSource, ShardSource
    from .predictor import ModelSpec
    from .result_log import LOG_NAME, ResultLog, log_header
    from .runs import checkpoint_iteration, log_evaluation_run
    from .testdev import write_test_dev_results

    # The model: loaded here once, so that a checkpoint not matching its config fails at once.
    model, cfg, categories = load_model(ref, overrides, execution)
    print(f"[evaluate] model {ref.path} ({ref.how})", file=sys.stderr)

    # The data: ground truth (or the image-info file) and where the images are.
    if split == "test-dev":
        truth, where = coco_gt_from_json(image_info), image_info
    elif coco_json:
        truth, where = coco_gt_from_json(coco_json), coco_json
    else:
        truth, where = coco_gt_from_shards(shards), shards
    source = ShardSource(shards) if shards else FileSource.from_coco(truth, images_dir)
    image_ids = source.image_ids()
    listed = set(truth.getImgIds())
    strangers = set(image_ids) - listed
    if strangers:
        raise UserError(
            f"{len(strangers)} images of {source.describe()} are not in {where}: {sorted(strangers)[:5]}"
        )
    if split == "test-dev" and listed - set(image_ids):
        missing = sorted(listed - set(image_ids))
        raise UserError(
            f"{len(missing)} images of {where} are not in {source.describe()}: {missing[:5]}"
        )
    if max_images:
        image_ids = image_ids[:max_images]
    ids = category_ids(categories, truth.dataset["categories"], cfg.model.num_classes, where)

    # Inference, streamed into the log (resumed if the log is there).
    spec = ModelSpec(ref.path, tuple(ids), tuple(overrides.items()), execution.device)
    out = Path(output_dir)
    with ResultLog(out / LOG_NAME, log_header(spec, cfg, source.describe()), overwrite) as log:
        done_before = len(log.done_ids & set(image_ids))
        if done_before:
            print(
                f"[evaluate] resuming: {done_before} of {len(image_ids)} images already done",
                file=sys.stderr,
            )
        outcome = run_inference(
            source,
            spec,
            log,
            image_ids,
            execution=execution,
            on_record=Progress("evaluate", len(image_ids), done_before),
            loaded=(model, cfg) if execution.local else None,
        )
        window_iou = None
        if window_masks:
            from .window_masks import evaluate_window_masks

            window_iou = evaluate_window_masks(model, shards, cfg, max_images)
        del model
        report_failures("evaluate", outcome.failures)
        if not outcome.done_ids:
            raise UserError(f"no image of {source.describe()} could be processed")
        done = sorted(outcome.done_ids)

        uri = resolve_tracking_uri(mlflow_uri or cfg.tracking.mlflow_uri)
        # A store named by the user (or the checkpoint's config) gets a run even without a
        # training run to nest it under; the default ./mlflow.db does not.
        standalone = bool(
            mlflow_uri or cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
        )
        run_split = split_name(split, shards, coco_json)
        params = {
            "checkpoint": ref.path,
            "model": model_uri or "",
            "split": split,
            "data": source.describe(),
            "max_images": max_images,
            **{f"inference.{k}": v for k, v in vars(cfg.inference).items()},
            "input.min_size_test": cfg.input.min_size_test,
            "input.max_size_test": cfg.input.max_size_test,
        }
        dataset = dataset_summary(shards) if shards else None
        common = dict(
            output_dir=out,
            checkpoint=ref.path,
            split=run_split,
            data=source.describe(),
            num_images=len(done),
            skipped_images=dict(outcome.failures),
            mlflow_uri=uri,
        )
        if split == "test-dev":
            results = list(log.iter_results(done))
            json_path, zip_path = write_test_dev_results(
                results, truth, out, name, processed_image_ids=done
            )
            run_id = None
            if log_to_mlflow:
                run_id = log_evaluation_run(
                    ref,
                    uri,
                    cfg.tracking.experiment,
                    run_split,
                    {f"{metric_prefix}/num_images": len(done)},
                    checkpoint_iteration(ref.path) or 0,
                    params,
                    [zip_path],
                    dataset,
                    standalone,
                )
            return EvalResult(
                **common,
                num_detections=len(results),
                files=(json_path, zip_path),
                mlflow_run_id=run_id,
            )
        results = list(log.iter_results(done))

    detections_path = _write_json(out / "detections.json", results)
    metrics = evaluate_coco(truth, results, image_ids=done)
    found = instances_found(truth, results, image_ids=done)
    found = {k: v for k, v in found.items() if k != "per_image"}
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
            {"image_id": i, "file_name": file_name, "error": error}
            for i, (file_name, error) in sorted(outcome.failures.items())
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
    summary["instances_found"] = found
    if window_iou is not None:
        summary["window_masks"] = window_iou
    metrics_path = _write_json(out / "metrics.json", summary)
    run_id = None
    if log_to_mlflow:
        logged = {
            f"{metric_prefix}/{key}": value for key, value in metrics.items() if value >= 0
        }  # -1 (no ground truth of that size) is not a score
        logged[f"{metric_prefix}/num_images"] = len(done)
        logged[f"{metric_prefix}/instances_found"] = found["found"]
        for key, value in (window_iou or {}).items():
            if value >= 0:
                logged[f"{metric_prefix}/window_masks/{key}"] = value
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
            run_split,
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
        else:
            print(
                "[evaluate] not logged to MLflow: no training run of this checkpoint is known; "
                "--mlflow-uri URI logs it as a run of its own",
                file=sys.stderr,
            )
    return EvalResult(
        **common,
        num_detections=len(results),
        metrics=metrics,
        instances_found=found,
        window_masks=window_iou,
        files=(detections_path, metrics_path),
        mlflow_run_id=run_id,
    )


def _write_json(path: Path, value) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(value, f)
    tmp.replace(path)
    return path


__all__ = ["EvalResult", "SPLITS", "category_ids", "check_data", "run_evaluation", "split_name"]

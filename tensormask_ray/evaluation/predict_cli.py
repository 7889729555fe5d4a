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
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError
from .options import (
    add_execution_arguments,
    add_model_arguments,
    add_test_time_arguments,
    check_execution,
    inference_overrides,
    load_model,
)

if TYPE_CHECKING:
    from ..data.manifest import CategoryMap

DEFAULT_SCORE_THRESH = 0.5


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


def overlay_names(files: list[Path]) -> list[str]:
    """One PNG name per input, after the image's name; a repeated name gets -2, -3, ..."""
    names, seen = [], {}
    for f in files:
        stem = f.stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}.png")
    return names


def record_to_prediction(
    results: list[dict], height: int, width: int, categories: CategoryMap
) -> dict:
    """COCO result dicts of one image back into the prediction format (masks decoded from RLE;
    labels: class indices in `categories`)."""
    from pycocotools import mask as mask_utils

    boxes = np.array([r["bbox"] for r in results], dtype=np.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    if results:
        masks = (
            mask_utils.decode([r["segmentation"] for r in results]).transpose(2, 0, 1).astype(bool)
        )
    else:
        masks = np.zeros((0, height, width), dtype=bool)
    return {
        "boxes": boxes,
        "scores": np.array([r["score"] for r in results], dtype=np.float64),
        "labels": np.array(categories.indices([r["category_id"] for r in results]), dtype=np.int64),
        "masks": masks,
    }


def run(args: argparse.Namespace) -> int:
    from ..data.manifest import CategoryMap
    from ..data.transforms import decode_image
    from .batch_inference import run_inference
    from .image_sources import FileSource, image_files
    from .predictor import ModelSpec
    from .result_log import LOG_NAME, ResultLog, log_header
    from .visualize import save_overlay

    check_execution(args)
    if not 0 <= args.alpha <= 1:
        raise UserError(f"--alpha {args.alpha}: must be in [0, 1]")
    files = image_files(args.inputs)
    overrides = inference_overrides(args)
    ref, model, cfg, categories = load_model(args, overrides)
    local = args.num_actors == 0
    model_categories = CategoryMap.of_model(
        categories, cfg.model.num_classes, f"checkpoint {ref.path}"
    )
    category_ids, class_names = list(model_categories.ids), list(model_categories.names)
    names_by_id = dict(zip(category_ids, class_names))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = FileSource.from_paths(files)
    png_names = overlay_names(files)
    entries: dict[int, dict] = {}

    def draw(record: dict) -> None:
        """Called as each image's record arrives: its overlay and its detections entry."""
        image_id, path = int(record["image_id"]), files[int(record["image_id"])]
        if record["error"]:
            print(f"[predict] skipped {path}: {record['error']}", file=sys.stderr)
            entries[image_id] = {"file": str(path), "error": record["error"]}
            return
        results = json.loads(record["results"])
        h, w = int(record["height"]), int(record["width"])
        prediction = record_to_prediction(results, h, w, model_categories)
        overlay = save_overlay(
            out / png_names[image_id], decode_image(path.read_bytes()), prediction, class_names,
            score_thresh=args.score_thresh, alpha=args.alpha,
        )  # fmt: skip
        instances = [
            {
                "category_id": r["category_id"],
                "category_name": names_by_id[r["category_id"]],
                "score": r["score"],
                "bbox": r["bbox"],
                "segmentation": r["segmentation"],
            }
            for r in results
        ]
        entries[image_id] = {
            "file": str(path),
            "overlay": str(overlay),
            "height": h,
            "width": w,
            "instances": instances,
        }

    spec = ModelSpec(ref.path, tuple(category_ids), tuple(overrides.items()), args.device)
    with ResultLog(out / LOG_NAME, log_header(spec, cfg, source.describe()), overwrite=True) as log:
        outcome = run_inference(
            source, spec, log,
            num_actors=args.num_actors, batch_size=args.batch_size, cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=1.0 if args.device == "cuda" else 0.0, strict=args.strict,
            address=args.address, on_record=draw, loaded=(model, cfg) if local else None,
        )  # fmt: skip

    detections_path = out / "detections.json"
    detections_path.write_text(json.dumps([entries[i] for i in sorted(entries)], indent=1))
    drawn = len(outcome.done_ids)
    count = sum(len(e.get("instances", ())) for e in entries.values())
    print(f"wrote {drawn} overlays to {out} and {count} detections to {detections_path}")
    if outcome.failures:
        print(
            f"[predict] {len(outcome.failures)} of {len(files)} images could not be decoded (listed above)",
            file=sys.stderr,
        )
    return 0 if drawn else 1

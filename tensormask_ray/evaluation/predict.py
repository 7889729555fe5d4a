"""The predict pipeline: images run through a resolved checkpoint (in this process or on Ray
Data actors, the same per-image work as `evaluate`), each drawn with its instances (mask in its
own colour, contour, "class score" label) as <output_dir>/<image name>.png, and every detection
in <output_dir>/detections.json. `tensormask_ray.api.predict` resolves the checkpoint and calls
`run_prediction`; `tensormask-ray predict` prints the result."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from .options import Execution, load_model

if TYPE_CHECKING:
    from ..data.manifest import CategoryMap
    from .runs import CheckpointRef

DEFAULT_SCORE_THRESH = 0.5


@dataclass(frozen=True)
class PredictResult:
    """What a prediction drew and found."""

    output_dir: Path
    checkpoint: str
    overlays: tuple[Path, ...]  # one PNG per image decoded, in input order
    detections: tuple[dict[str, Any], ...]  # per input image: file, overlay, height, width,
    # instances [{category_id, category_name, score, bbox, segmentation}] (or file, error)
    detections_file: Path
    skipped: dict[str, str] = field(default_factory=dict)  # file -> why it could not be decoded

    @property
    def num_detections(self) -> int:
        return sum(len(e.get("instances", ())) for e in self.detections)


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


def run_prediction(
    ref: CheckpointRef,
    files: list[Path],
    output_dir: str | Path,
    overrides: dict[str, Any],
    execution: Execution,
    *,
    score_thresh: float,
    alpha: float = 0.5,
) -> PredictResult:
    """Draws and lists the detections of `files` (image_files(...) of the inputs) scoring at
    least `score_thresh` (also the detection threshold in `overrides`, so the JSON holds exactly
    what the pictures show). An image that cannot be decoded is reported on stderr and skipped,
    or stops the run with execution.strict."""
    from ..data.manifest import CategoryMap
    from ..data.transforms import decode_image
    from .batch_inference import run_inference
    from .image_sources import FileSource
    from .predictor import ModelSpec
    from .result_log import LOG_NAME, ResultLog, log_header
    from .visualize import save_overlay

    if not 0 <= alpha <= 1:
        raise UserError(f"--alpha {alpha}: must be in [0, 1]")
    model, cfg, categories = load_model(ref, overrides, execution)
    model_categories = CategoryMap.of_model(
        categories, cfg.model.num_classes, f"checkpoint {ref.path}"
    )
    category_ids, class_names = list(model_categories.ids), list(model_categories.names)
    names_by_id = dict(zip(category_ids, class_names))

    out = Path(output_dir)
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
            out / png_names[image_id],
            decode_image(path.read_bytes()),
            prediction,
            class_names,
            score_thresh=score_thresh,
            alpha=alpha,
        )
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

    spec = ModelSpec(ref.path, tuple(category_ids), tuple(overrides.items()), execution.device)
    with ResultLog(out / LOG_NAME, log_header(spec, cfg, source.describe()), overwrite=True) as log:
        run_inference(
            source,
            spec,
            log,
            execution=execution,
            on_record=draw,
            loaded=(model, cfg) if execution.local else None,
        )

    detections = [entries[i] for i in sorted(entries)]
    detections_path = out / "detections.json"
    detections_path.write_text(json.dumps(detections, indent=1))
    return PredictResult(
        output_dir=out,
        checkpoint=ref.path,
        overlays=tuple(Path(e["overlay"]) for e in detections if "overlay" in e),
        detections=tuple(detections),
        detections_file=detections_path,
        skipped={e["file"]: e["error"] for e in detections if "error" in e},
    )


__all__ = [
    "DEFAULT_SCORE_THRESH",
    "PredictResult",
    "overlay_names",
    "record_to_prediction",
    "run_prediction",
]

"""COCO evaluation, independent of the model: predictions -> COCO result dicts -> mask/box AP.

A prediction is what the model's inference returns for one image (torchvision's detection
format), in the original image's coordinates:

    {"boxes": float (K, 4) xyxy, "scores": float (K,), "labels": int (K,) contiguous class index,
     "masks": bool (K, H, W) at the image's size}

as torch tensors (any device) or numpy arrays. Class index `i` is COCO category id
`category_ids[i]`, the manifest's categories in order (sorted by id).

Results stream per image: call `predictions_to_coco` as each image is predicted (in a Ray Data
worker or the driver), extend one list, remember which image ids were processed, and call
`evaluate_coco(coco_gt, results, image_ids=processed)` once at the end.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..errors import UserError
from ..finite import is_finite_number

IOU_TYPES = ("segm", "bbox")
METRIC_NAMES = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")  # COCOeval.stats[0:6], in order
NO_GROUND_TRUTH = -1.0  # COCOeval's value for a metric whose area range has no ground truth


class _DropPycocotoolsPrints(logging.Filter):
    """Drops the log records of print calls made from pycocotools' own files."""

    def __init__(self) -> None:
        super().__init__()
        import pycocotools

        self.folder = os.path.dirname(os.path.abspath(pycocotools.__file__)) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return not os.path.abspath(record.pathname).startswith(self.folder)


@contextlib.contextmanager
def quiet_stdout():
    """Silences pycocotools' prints: sys.stdout goes to a buffer (yielded) while this runs.

    Inside a Ray Train worker that is not enough: Ray replaces `print` there with one that
    writes to a redirected sys.stdout *and* logs the line to the root logger, whose console
    handler prints it (`ray/train/v2/_internal/logging/patch_print.py`, `redirected_print`). So
    for the same span the root logger also drops the records whose call site is a pycocotools
    file; everything else logged or printed meanwhile goes through as before. `print` itself is
    never replaced."""
    sink = io.StringIO()
    root = logging.getLogger()
    drop = _DropPycocotoolsPrints()
    root.addFilter(drop)
    try:
        with contextlib.redirect_stdout(sink):
            yield sink
    finally:
        root.removeFilter(drop)


def as_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like as a numpy array, without copying when it can."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def encode_masks(masks: Any) -> list[dict]:
    """Binary masks (K, H, W) -> K compressed COCO RLEs {"size": [H, W], "counts": str}."""
    masks = as_numpy(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (K, H, W), got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    masks = masks.astype(bool, copy=False).view(np.uint8)
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))  # (H, W, K), one copy
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON-serialisable
    return rles


def rle_areas(rles: Sequence[dict]) -> np.ndarray:
    """Pixel counts of compressed RLEs, (N,) uint32.

    pycocotools' `area` fails for 256 or more RLEs in one call under numpy 2 (it builds a uint8
    array holding N), so they are counted 255 at a time.
    """
    chunks = [mask_utils.area(list(rles[i : i + 255])) for i in range(0, len(rles), 255)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint32)


def predictions_to_coco(prediction: dict, image_id: int, category_ids: Sequence[int]) -> list[dict]:
    """One image's prediction -> COCO result dicts, one per detection.

    Each has image_id, category_id (COCO's id space), bbox [x, y, w, h], score and, when the
    prediction has "masks", segmentation (compressed RLE with a str "counts"). Everything is
    plain Python, so the list can go straight to `json.dump` or across Ray's object store.
    """
    boxes = as_numpy(prediction["boxes"]).astype(np.float64).reshape(-1, 4)  # (K, 4) xyxy
    scores = as_numpy(prediction["scores"]).astype(np.float64).reshape(-1)  # (K,)
    labels = as_numpy(prediction["labels"]).astype(np.int64).reshape(-1)  # (K,)
    k = len(scores)
    if len(boxes) != k or len(labels) != k:
        raise ValueError(f"{len(boxes)} boxes, {k} scores and {len(labels)} labels differ")
    if k and (labels.min() < 0 or labels.max() >= len(category_ids)):
        raise ValueError(f"labels outside [0, {len(category_ids)}): {sorted(set(labels.tolist()))}")
    rles = encode_masks(prediction["masks"]) if "masks" in prediction else None
    if rles is not None and len(rles) != k:
        raise ValueError(f"{len(rles)} masks for {k} detections")

    xywh = boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    results = []
    for i in range(k):
        result = {
            "image_id": int(image_id),
            "category_id": int(category_ids[labels[i]]),
            "bbox": xywh[i].tolist(),
            "score": float(scores[i]),
        }
        if rles is not None:
            result["segmentation"] = rles[i]
        results.append(result)
    return results


def evaluate_coco(
    coco_gt: COCO,
    results: Sequence[dict],
    iou_types: Iterable[str] = IOU_TYPES,
    image_ids: Iterable[int] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """COCO AP of `results` against `coco_gt`: {"segm/AP", "segm/AP50", ..., "bbox/AP_L"}.

    Values are fractions in [0, 1], except that a metric whose area range (small < 32^2 <= medium
    < 96^2 <= large) has no ground-truth instance among the evaluated images is -1
    (`NO_GROUND_TRUTH`), COCOeval's own convention, kept so that "undefined" never reads as "0 AP".
    `format_metrics_table` shows it as "-".

    image_ids: the images to evaluate (COCOeval's params.imgIds). None means every image of
    `coco_gt`, so an image with no results counts as all-missed. To evaluate a subset (e.g. the
    first N validation images), pass the ids of the images that were processed, *including* those
    with no detections; passing only the ids seen in `results` would drop the images the model
    found nothing in and overstate AP.

    An empty `results` gives 0.0 (-1 where there is no ground truth), like any other run in which
    nothing is found. pycocotools' printing is shown only when verbose.
    """
    iou_types = tuple(iou_types)
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown:
        raise ValueError(f"iou_types must be among {IOU_TYPES}, got {unknown}")
    gt_image_ids = set(coco_gt.getImgIds())
    image_ids = sorted(gt_image_ids) if image_ids is None else sorted({int(i) for i in image_ids})
    _check_ids("image ids to evaluate", image_ids, gt_image_ids, "the ground truth's images")
    _check_ids(
        "result image ids", {r["image_id"] for r in results}, set(image_ids), "the images evaluated"
    )
    _check_ids(
        "result category ids",
        {r["category_id"] for r in results},
        set(coco_gt.getCatIds()),
        "the ground truth's categories",
    )

    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        coco_dt = _results_coco(coco_gt, results, iou_type)
        quiet = contextlib.nullcontext() if verbose else quiet_stdout()
        with quiet:
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, value in zip(METRIC_NAMES, evaluator.stats[: len(METRIC_NAMES)]):
            metrics[f"{iou_type}/{name}"] = float(value) if value >= 0 else NO_GROUND_TRUTH
    return metrics


def format_metrics_table(metrics: dict[str, float]) -> str:
    """`evaluate_coco`'s metrics as a table: a row per IoU type, AP columns in percent."""
    header = f"{'':6}" + "".join(f"{name:>7}" for name in METRIC_NAMES)
    lines = [header]
    for iou_type in IOU_TYPES:
        if not any(f"{iou_type}/{name}" in metrics for name in METRIC_NAMES):
            continue
        cells = []
        for name in METRIC_NAMES:
            value = metrics.get(f"{iou_type}/{name}")
            known = is_finite_number(value) and value >= 0
            cells.append(f"{100 * value:7.1f}" if known else f"{'-':>7}")
        lines.append(f"{iou_type:6}" + "".join(cells))
    return "\n".join(lines)


def _results_coco(coco_gt: COCO, results: Sequence[dict], iou_type: str) -> COCO:
    """The results as a pycocotools COCO object, as `COCO.loadRes` would build it, except that it
    accepts an empty list, leaves `results` untouched, prints nothing, and for "segm" uses the
    mask's area (not the box's) for the small/medium/large split, as Detectron2 does."""
    anns = []
    if iou_type == "segm":
        missing = sum("segmentation" not in r for r in results)
        if missing:
            raise UserError(f"{missing} of {len(results)} results have no segmentation: no mask AP")
        rles = [r["segmentation"] for r in results]
        areas = rle_areas(rles)
        boxes = mask_utils.toBbox(rles) if rles else []
        for i, r in enumerate(results):
            anns.append({**r, "area": float(areas[i]), "bbox": boxes[i].tolist()})
    else:
        for r in results:
            ann = {key: value for key, value in r.items() if key != "segmentation"}
            ann["area"] = float(r["bbox"][2] * r["bbox"][3])
            anns.append(ann)
    for i, ann in enumerate(anns):
        ann["id"] = i + 1
        ann["iscrowd"] = 0

    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": anns,
    }
    with quiet_stdout():
        coco_dt.createIndex()
    return coco_dt


def describe_ids(ids: Iterable[int], limit: int = 5) -> str:
    """Ids for an error message: "3, 9, 12" or "3, 9, 12, 15, 20 and 1019 more"."""
    ids = list(ids)
    try:
        ids.sort()
    except TypeError:  # a malformed record's id (None, a string) among ints
        ids.sort(key=repr)
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown if len(ids) <= limit else f"{shown} and {len(ids) - limit} more"


def _check_ids(what: str, ids: Iterable[int], allowed: set[int], where: str) -> None:
    bad = set(ids) - allowed
    if bad:
        raise UserError(f"{len(bad)} {what} are not among {where}: {describe_ids(bad)}")

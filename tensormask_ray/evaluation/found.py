"""How many ground-truth instances a model finds: the count a person checking the overlays would
make. An instance is found when a detection of its class scoring at least `score_thresh` has a
mask IoU of at least `iou_thresh` with it; each detection finds at most one instance (greedy by
score, each taking the unmatched instance it overlaps most, as COCO's matching does at one IoU
threshold). Crowd regions are not instances to find.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

SCORE_THRESH = 0.5
IOU_THRESH = 0.5


def instances_found(
    coco_gt: COCO,
    results: Sequence[dict],
    image_ids: Iterable[int] | None = None,
    score_thresh: float = SCORE_THRESH,
    iou_thresh: float = IOU_THRESH,
) -> dict[str, Any]:
    """-> {"found", "instances", "score_thresh", "iou_thresh", "per_image": {image_id: [found,
    instances]}} over `image_ids` (default: every image of `coco_gt`), for COCO result dicts
    (with "segmentation" RLEs)."""
    ids = sorted(coco_gt.getImgIds() if image_ids is None else {int(i) for i in image_ids})
    by_image: dict[int, list[dict]] = {i: [] for i in ids}
    for r in results:
        if r["score"] >= score_thresh and int(r["image_id"]) in by_image:
            by_image[int(r["image_id"])].append(r)
    per_image: dict[int, list[int]] = {}
    for image_id in ids:
        truth = [
            a
            for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id]))
            if not a.get("iscrowd", 0)
        ]
        dets = sorted(by_image[image_id], key=lambda r: -r["score"])
        per_image[image_id] = [_matches(coco_gt, truth, dets, iou_thresh), len(truth)]
    return {
        "found": sum(f for f, _ in per_image.values()),
        "instances": sum(n for _, n in per_image.values()),
        "score_thresh": score_thresh,
        "iou_thresh": iou_thresh,
        "per_image": per_image,
    }


def _matches(coco_gt: COCO, truth: list[dict], dets: list[dict], iou_thresh: float) -> int:
    if not truth or not dets:
        return 0
    gt_rles = [coco_gt.annToRLE(a) for a in truth]
    ious = np.asarray(
        mask_utils.iou([d["segmentation"] for d in dets], gt_rles, [0] * len(truth)),
        dtype=np.float64,
    )
    ious = ious.reshape(len(dets), len(truth))  # (detections, instances)
    same_class = np.array([[d["category_id"] == a["category_id"] for a in truth] for d in dets])
    ious = np.where(same_class, ious, -1.0)
    taken = np.zeros(len(truth), dtype=bool)
    for row in ious:  # detections by decreasing score
        row = np.where(taken, -1.0, row)
        best = int(np.argmax(row))
        if row[best] >= iou_thresh:
            taken[best] = True
    return int(taken.sum())


def format_found(found: dict[str, Any]) -> str:
    return (
        f"found {found['found']} of {found['instances']} instances (a detection of the right class with score "
        f">= {found['score_thresh']:g} and mask IoU >= {found['iou_thresh']:g})"
    )


__all__ = ["IOU_THRESH", "SCORE_THRESH", "format_found", "instances_found"]

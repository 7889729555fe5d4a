"""Ground truth for evaluation: a pycocotools COCO object, rebuilt in memory from the Parquet
shards and their manifest (see `tensormask_ray.data.schema`), or read from a COCO json file.

Also `instances_from_coco`: one image's ground truth in the prediction format, for drawing it
next to a prediction (and for tests that feed the ground truth back as detections).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from pycocotools.coco import COCO

from ..data.coco_io import load_coco_json
from ..data.manifest import CategoryMap, read_manifest, shard_paths
from ..errors import UserError
from .coco import quiet_stdout

# Every shard column but the image itself, which evaluation never needs.
_GT_COLUMNS = [
    "image_id", "file_name", "height", "width",
    "ann_ids", "category_ids", "boxes", "areas", "iscrowd", "rle_counts",
]  # fmt: skip


def coco_gt_from_shards(shards_dir: str | Path) -> COCO:
    """The COCO ground truth of a shards folder (images, annotations with RLE masks, categories).

    Only the shards the manifest lists are read, and only their annotation columns (not the
    images). A folder of kind "image_info" (test-dev) gives images and categories, no annotations.
    """
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    images, annotations = [], []
    for path in shard_paths(shards_dir, manifest, nonempty=False):
        try:
            rows = pq.read_table(path, columns=_GT_COLUMNS).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged or foreign file
            raise UserError(f"{path}: not a readable shard ({e})") from e
        for row in rows:
            h, w = int(row["height"]), int(row["width"])
            images.append(
                {"id": row["image_id"], "file_name": row["file_name"], "height": h, "width": w}
            )
            for ann_id, cat_id, box, area, crowd, counts in zip(
                row["ann_ids"], row["category_ids"], row["boxes"], row["areas"],
                row["iscrowd"], row["rle_counts"],
            ):  # fmt: skip
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": row["image_id"],
                        "category_id": cat_id,
                        "bbox": [float(v) for v in box],
                        "area": float(area),
                        "iscrowd": int(crowd),
                        "segmentation": {"size": [h, w], "counts": counts},
                    }
                )
    dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in manifest["categories"]],
    }
    return _coco_from_dataset(dataset, source=str(shards_dir))


def coco_gt_from_json(path: str | Path) -> COCO:
    """A COCO annotation or image-info json (e.g. image_info_test-dev2017.json) as a COCO object.

    The file needs "images" and "categories"; "annotations" may be absent (image-info files).
    """
    dataset, _ = load_coco_json(path)
    return _coco_from_dataset(dataset, source=str(path))


def instances_from_coco(
    coco: COCO, image_id: int, categories: CategoryMap, include_crowd: bool = False
) -> dict[str, torch.Tensor]:
    """One image's ground truth in the prediction format, without "scores":
    {"boxes": (K, 4) xyxy float32, "labels": (K,) int64 class index, "masks": (K, H, W) bool};
    annotations of categories not in `categories` are left out."""
    info = coco.imgs[image_id]
    anns = [
        a for a in coco.imgToAnns[image_id]
        if (include_crowd or not a.get("iscrowd", 0)) and a["category_id"] in categories
    ]  # fmt: skip
    h, w = int(info["height"]), int(info["width"])
    masks = np.zeros((len(anns), h, w), dtype=bool)
    for i, ann in enumerate(anns):
        masks[i] = coco.annToMask(ann).astype(bool)
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    labels = torch.tensor(categories.indices([a["category_id"] for a in anns]), dtype=torch.int64)
    return {"boxes": boxes, "labels": labels, "masks": torch.from_numpy(masks)}


def _coco_from_dataset(dataset: dict, source: str) -> COCO:
    for key in ("images", "categories"):
        if not isinstance(dataset.get(key), list):
            raise UserError(f"{source}: no {key!r} list; not a COCO annotation or image-info file")
    dataset.setdefault("annotations", [])
    coco = COCO()
    coco.dataset = dataset
    try:
        with quiet_stdout():
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise UserError(f"{source}: malformed COCO record (missing or bad field {e})") from e
    return coco

"""A small COCO ground truth made here: four images, non-contiguous category ids (3, 7, 42),
small, medium and large objects, and one image with no object."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tensormask_ray.data.manifest import CategoryMap

CATEGORY_IDS = [3, 7, 42]
CLASS_NAMES = ["cat", "dog", "zebra"]
CATEGORY_MAP = CategoryMap(tuple(CATEGORY_IDS), tuple(CLASS_NAMES))


def _rect(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def make_dataset():
    """(COCO dataset dict, {image_id: [(category_id, mask), ...]})."""
    objects = {
        11: (120, 160, [(3, _rect(120, 160, 10, 10, 30, 30)),  # small, 400 px
                        (7, _rect(120, 160, 50, 60, 90, 110))]),  # medium, 2000 px
        25: (200, 240, [(42, _ellipse(200, 240, 100, 120, 60, 75)),  # large, ~14100 px
                        (42, _ellipse(200, 240, 20, 20, 12, 12)),  # small, ~450 px
                        (3, _rect(200, 240, 160, 180, 200, 240))]),  # medium, 1600 px, on the border
        30: (96, 128, [(3, _ellipse(96, 128, 48, 64, 25, 25))]),  # medium, ~1960 px
        40: (64, 64, []),
    }  # fmt: skip
    images, annotations, by_image = [], [], {}
    for image_id, (h, w, objs) in objects.items():
        images.append(
            {"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": h, "width": w}
        )
        by_image[image_id] = objs
        for category_id, mask in objs:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": 100 + len(annotations),
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": 0,
                    "segmentation": rle,
                }
            )
    categories = [
        {"id": i, "name": n, "supercategory": "animal"} for i, n in zip(CATEGORY_IDS, CLASS_NAMES)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}, by_image


def coco_from_dataset(dataset) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def gt_predictions(by_image, erode: int = 0, keep_boxes: bool = True):
    """{image_id: prediction} made from the ground truth, score 1; masks eroded by `erode` px,
    boxes those of the ground truth (keep_boxes) or of the eroded masks."""
    predictions = {}
    for image_id, objs in by_image.items():
        h, w = objs[0][1].shape if objs else (1, 1)
        masks = (
            torch.from_numpy(np.stack([m for _, m in objs]))
            if objs
            else torch.zeros(0, h, w, dtype=torch.bool)
        )
        boxes = masks_to_boxes(masks)
        if erode:
            masks = erode_masks(masks, erode)
            if not keep_boxes:
                boxes = masks_to_boxes(masks)
        labels = torch.tensor([CATEGORY_IDS.index(c) for c, _ in objs], dtype=torch.int64)
        predictions[image_id] = {
            "boxes": boxes,
            "scores": torch.ones(len(objs)),
            "labels": labels,
            "masks": masks,
        }
    return predictions


def erode_masks(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion as a max-pool of the inverted mask (no scipy)."""
    background = (~masks).float()[:, None]  # (K, 1, H, W)
    grown = F.max_pool2d(background, 2 * radius + 1, stride=1, padding=radius)
    return ~(grown[:, 0] > 0)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(K, H, W) bool -> (K, 4) xyxy float32, pixel-edge coordinates (COCO's convention)."""
    boxes = torch.zeros(len(masks), 4)
    for i, m in enumerate(masks):
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes[i] = torch.tensor(
            [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32
        )
    return boxes

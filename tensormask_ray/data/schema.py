"""The on-disk contract between `data prepare` (writer) and everything that reads shards
(Ray Data streaming, evaluation ground truth): the Parquet columns and the manifest's fields.

One row per image. Masks are COCO RLE (compressed `counts` strings, size = (height, width));
polygons are converted to RLE once, when the shards are written. Category ids are COCO's ids; the
contiguous class index used by the model is a category's position in the manifest's
`categories` list (sorted by id).
"""

from __future__ import annotations

import pyarrow as pa

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{index:05d}.parquet"
MANIFEST_VERSION = 1

# Parquet schema of a shard. List columns hold one entry per annotation of the image.
SHARD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64()),
        pa.field("file_name", pa.string()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("image_bytes", pa.binary()),  # the file as stored: JPEG/PNG, not decoded
        pa.field("image_format", pa.string()),  # "jpeg" | "png" | ...
        pa.field("ann_ids", pa.list_(pa.int64())),
        pa.field("category_ids", pa.list_(pa.int32())),  # COCO category ids
        pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # COCO [x, y, w, h], image pixels
        pa.field("areas", pa.list_(pa.float32())),
        pa.field("iscrowd", pa.list_(pa.bool_())),
        pa.field(
            "rle_counts", pa.list_(pa.string())
        ),  # compressed RLE counts, size (height, width)
    ]
)

# Columns the training pipeline reads (the rest of a shard is for evaluation and humans).
TRAIN_COLUMNS = ["image_id", "image_bytes", "category_ids", "boxes", "iscrowd", "rle_counts"]

# manifest.json (written last, atomically):
# {
#   "version": 1,
#   "kind": "instances" | "image_info",      # annotated split, or test-dev style image list
#   "source": {"json": str, "sha256": str, "images_dir": str},
#   "categories": [{"id": int, "name": str, "supercategory": str}, ...],   # sorted by id
#   "shards": [{"file": "shard-00000.parquet", "images": int, "annotations": int}, ...],
#   "num_images": int, "num_annotations": int,
#   "skipped": [{"image_id": int | None, "ann_id": int | None, "reason": str}, ...]
# }

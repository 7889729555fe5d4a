"""One Parquet shard of `data prepare`: its images and annotations checked and converted to
rows (`build_rows`), written atomically with a footer saying what it was made from
(`write_shard`, run in a worker), and that footer read back (`shard_meta`)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from ..finite import is_finite_number
from . import schema
from .coco_geometry import box_problem, segmentation_to_rle
from .coco_records import Skips
from .image_files import image_file_problem

# Bump when the shard contents this code writes change: shards of another version are rewritten.
FORMAT_VERSION = 1
# Footer key-value metadata of a shard (see coco_to_parquet's module docstring).
SHARD_META_KEY = b"tensormask_ray.shard"
# Test hook, "INDEX:SECONDS": sleep that long between writing shard INDEX's temporary file and
# renaming it, so a test can kill `prepare` while a half-written shard exists. Not for users.
PAUSE_ENV = "TENSORMASK_RAY_PREPARE_PAUSE"
_ROW_GROUP_SIZE = 64


@dataclass
class ShardTask:
    index: int
    out_dir: str
    images_dir: str
    images: list[dict[str, Any]]
    annotations: list[list[dict[str, Any]]]
    fingerprint: str
    strict: bool

    @property
    def file(self) -> str:
        return schema.SHARD_PATTERN.format(index=self.index)


@dataclass
class ShardResult:
    index: int
    file: str
    images: int
    annotations: int
    skipped: list[dict[str, Any]]
    written: bool  # False: an existing complete shard was kept


def build_rows(task: ShardTask) -> tuple[dict[str, list[Any]], list[dict[str, Any]]]:
    """Checks and converts one shard's images and annotations -> (column dict, skipped)."""
    skips = Skips(task.strict)
    cols: dict[str, list[Any]] = {f.name: [] for f in schema.SHARD_SCHEMA}
    images_dir = Path(task.images_dir)
    for rec, anns in zip(task.images, task.annotations):
        image_id, h, w = rec["id"], rec["height"], rec["width"]
        where = f"image {image_id} ({rec['file_name']})"
        dropped = (
            f" ({len(anns)} annotation{'s' * (len(anns) != 1)} dropped with it)" if anns else ""
        )
        loaded, problem = image_file_problem(images_dir / rec["file_name"])
        if problem:
            skips.add(image_id, None, f"{where}: {problem}{dropped}")
            continue
        data, fmt, fh, fw = loaded
        if (fh, fw) != (h, w):
            problem = f"the file is {fw}x{fh} (width x height) but the JSON says {w}x{h}"
            skips.add(image_id, None, f"{where}: {problem}{dropped}")
            continue
        row = {
            "ann_ids": [],
            "category_ids": [],
            "boxes": [],
            "areas": [],
            "iscrowd": [],
            "rle_counts": [],
        }
        for ann in anns:
            ann_where = f"annotation {ann['id']} (image {image_id})"
            rle, problem = segmentation_to_rle(ann.get("segmentation"), h, w)
            if problem:
                skips.add(image_id, ann["id"], f"{ann_where}: {problem}")
                continue
            bbox = ann.get("bbox")
            if bbox is None:
                bbox = [float(v) for v in mask_utils.toBbox(_c_rle(rle))]
            problem = box_problem(bbox, h, w)
            if problem:
                skips.add(image_id, ann["id"], f"{ann_where}: {problem}")
                continue
            area = ann.get("area")
            if not is_finite_number(area) or area < 0:
                area = float(mask_utils.area(_c_rle(rle)))
            row["ann_ids"].append(ann["id"])
            row["category_ids"].append(ann["category_id"])
            row["boxes"].append([float(v) for v in bbox])
            row["areas"].append(float(area))
            row["iscrowd"].append(bool(ann.get("iscrowd", 0)))
            row["rle_counts"].append(rle["counts"])
        cols["image_id"].append(image_id)
        cols["file_name"].append(rec["file_name"])
        cols["height"].append(h)
        cols["width"].append(w)
        cols["image_bytes"].append(data)
        cols["image_format"].append(fmt)
        for k, v in row.items():
            cols[k].append(v)
    return cols, skips.records


def _c_rle(rle: dict[str, Any]) -> dict[str, Any]:
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


def shard_meta(path: Path) -> dict[str, Any] | None:
    """The footer metadata of a complete shard, or None if the file is not one (missing,
    truncated, foreign, or its row count disagrees with what its footer says it holds). Only
    those are answered None (the shard is rewritten); any other error is a bug and raised."""
    try:
        pf = pq.ParquetFile(path)
        meta = json.loads((pf.schema_arrow.metadata or {})[SHARD_META_KEY])
        if pf.metadata.num_rows != int(meta["images"]):
            return None
        if not pf.schema_arrow.remove_metadata().equals(schema.SHARD_SCHEMA):
            return None
        return meta
    # OSError: missing or unreadable; ArrowException / ValueError: not Parquet, truncated, a bad
    # JSON footer or count; KeyError / TypeError: a footer without our key or of another shape.
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None


def write_shard(task: ShardTask) -> ShardResult:
    """Builds and writes one shard: temporary hidden file, fsync, rename. Runs in a worker."""
    cols, skipped = build_rows(task)
    num_anns = sum(len(a) for a in cols["ann_ids"])
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": task.fingerprint,
        "index": task.index,
        "images": len(cols["image_id"]),
        "annotations": num_anns,
        "skipped": skipped,
    }
    table = pa.Table.from_pydict(cols, schema=schema.SHARD_SCHEMA).replace_schema_metadata(
        {SHARD_META_KEY: json.dumps(meta, sort_keys=True).encode()}
    )
    final = Path(task.out_dir) / task.file
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(
            table,
            tmp,
            row_group_size=_ROW_GROUP_SIZE,
            compression={
                f.name: ("none" if f.name == "image_bytes" else "zstd") for f in schema.SHARD_SCHEMA
            },
            use_dictionary=["file_name", "image_format"],
            write_statistics=["image_id", "height", "width"],
        )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _test_pause(task.index)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ShardResult(task.index, task.file, meta["images"], num_anns, skipped, written=True)


def _test_pause(index: int) -> None:
    spec = os.environ.get(PAUSE_ENV, "")
    if spec:
        at, seconds = spec.split(":")
        if int(at) == index:
            time.sleep(float(seconds))


__all__ = [
    "FORMAT_VERSION",
    "PAUSE_ENV",
    "SHARD_META_KEY",
    "ShardResult",
    "ShardTask",
    "build_rows",
    "shard_meta",
    "write_shard",
]

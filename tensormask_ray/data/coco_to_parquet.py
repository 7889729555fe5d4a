"""`data prepare`: a COCO instances (or image-info) JSON and its image folder -> Parquet shards
(`schema.SHARD_SCHEMA`, one row per image) and a manifest.

How it is safe to run on 118k images:
  * Checks. Every record is checked once, here: the JSON's structure (in the driver), then each
    image file (exists, decodes fully, has the size the JSON says) and each annotation's geometry
    (box inside the image, polygon not empty or degenerate, RLE of the image's size) in the
    workers. A bad record is skipped with a reason naming the image / annotation id and what is
    wrong, and listed in the manifest; with `strict=True` the first one raises `DataError`.
    Polygons and uncompressed RLE become compressed RLE here, once.
  * Resumable. Shard i holds the i-th `shard_size` images in image-id order. It is written to a
    hidden temporary name and renamed when complete; its Parquet footer carries a fingerprint
    of what it was made from (the JSON's checksum, shard size, index, the image files' sizes and
    mtimes, this code's format version) and its counts and skipped records. A re-run keeps a
    shard whose footer reads back with that fingerprint and the recorded row count, and
    rewrites anything else. The manifest is removed before the first shard is rewritten and
    written last, atomically, so a folder with a manifest is always complete and consistent.
  * Parallel: shards are written by a process pool (spawned; `workers=1` runs inline).
"""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

from ..finite import is_finite_number
from . import schema
from .coco_io import load_coco_json
from .errors import DataError
from .manifest import write_manifest

# Bump when the shard contents this code writes change: shards of another version are rewritten.
FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 256
# A box may pass the image border by this many pixels (rounding in real annotations).
BOX_TOLERANCE = 1.0
# Footer key-value metadata of a shard (see module docstring).
SHARD_META_KEY = b"tensormask_ray.shard"
# Test hook, "INDEX:SECONDS": sleep that long between writing shard INDEX's temporary file and
# renaming it, so a test can kill `prepare` while a half-written shard exists. Not for users.
PAUSE_ENV = "TENSORMASK_RAY_PREPARE_PAUSE"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")
_TMP_RE = re.compile(r"^\.shard-\d{5,}\.parquet\..*\.tmp$")
_LOCK_NAME = ".prepare.lock"
_ROW_GROUP_SIZE = 64
_INLINE_BELOW = 200  # images: with workers=None, fewer than this are written without a pool


# ----------------------------------------------------------------------------- records


def skip_record(image_id: int | None, ann_id: int | None, reason: str) -> dict[str, Any]:
    return {"image_id": image_id, "ann_id": ann_id, "reason": reason}


class _Skips:
    """Collects skipped records; in strict mode the first one raises `DataError`."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.records: list[dict[str, Any]] = []

    def add(self, image_id: int | None, ann_id: int | None, reason: str) -> None:
        if self.strict:
            raise DataError(reason)
        self.records.append(skip_record(image_id, ann_id, reason))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class CocoSource:
    """A COCO JSON, structurally checked: images (sorted by id) and their annotations."""

    path: Path
    sha256: str
    kind: str  # "instances" | "image_info"
    categories: list[dict[str, Any]]  # sorted by id
    images: list[dict[str, Any]]  # valid image records, sorted by id
    annotations: dict[int, list[dict[str, Any]]]  # image id -> its valid annotations, JSON order
    skipped: list[dict[str, Any]] = field(default_factory=list)
    num_source_images: int = 0
    num_source_annotations: int = 0


def _check_categories(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    cats = data.get("categories")
    if not isinstance(cats, list):
        raise DataError(f"{path}: malformed COCO JSON: no 'categories' list")
    out, seen = [], set()
    for i, c in enumerate(cats):
        if (
            not isinstance(c, dict)
            or not _is_int(c.get("id"))
            or not isinstance(c.get("name"), str)
        ):
            raise DataError(
                f"{path}: malformed category record #{i} {c!r}: needs an integer 'id' and a 'name'"
            )
        if c["id"] in seen:
            raise DataError(f"{path}: category id {c['id']} appears twice in 'categories'")
        seen.add(c["id"])
        out.append(
            {"id": c["id"], "name": c["name"], "supercategory": str(c.get("supercategory", ""))}
        )
    return sorted(out, key=lambda c: c["id"])


def _image_problem(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return f"not an object ({type(rec).__name__})"
    if not isinstance(rec.get("file_name"), str) or not rec["file_name"]:
        return "no 'file_name'"
    for key in ("height", "width"):
        if not _is_int(rec.get(key)) or rec[key] <= 0:
            return f"'{key}' is {rec.get(key)!r}, expected a positive integer"
    return None


def read_coco(path: str | Path, strict: bool = False) -> CocoSource:
    """Parses and structurally checks a COCO instances or image-info JSON.

    Skipped (or, strict, raised): image records without a valid id / file_name / height / width,
    duplicate image or annotation ids, annotations of unknown images or unknown category ids,
    annotations without an integer id or with an iscrowd other than 0/1. Geometry and image
    files are checked later, per shard (`write_shard`)."""
    path = Path(path)
    data, sha = load_coco_json(path)
    if not isinstance(data.get("images"), list):
        raise DataError(f"{path}: malformed COCO JSON: no 'images' list")
    categories = _check_categories(path, data)
    kind = "instances" if "annotations" in data else "image_info"
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise DataError(f"{path}: malformed COCO JSON: 'annotations' is not a list")
    skips = _Skips(strict)

    images: dict[int, dict[str, Any]] = {}
    bad_images: dict[int, str] = {}
    for i, rec in enumerate(data["images"]):
        image_id = rec.get("id") if isinstance(rec, dict) else None
        if not _is_int(image_id):
            skips.add(None, None, f"image record #{i}: no integer 'id' ({rec!r:.120})")
            continue
        if image_id in images or image_id in bad_images:
            skips.add(
                image_id,
                None,
                f"image {image_id}: duplicate image id (record #{i}); the first record is kept",
            )
            continue
        problem = _image_problem(rec)
        if problem:
            bad_images[image_id] = f"image {image_id}: malformed image record: {problem}"
            if strict:
                raise DataError(bad_images[image_id])
            continue
        images[image_id] = {
            "id": image_id,
            "file_name": rec["file_name"],
            "height": rec["height"],
            "width": rec["width"],
        }

    by_image: dict[int, list[dict[str, Any]]] = {}
    dropped_with_image: dict[int, int] = {}
    seen_anns: set[int] = set()
    cat_ids = {c["id"] for c in categories}
    for i, ann in enumerate(anns):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        if not _is_int(ann_id):
            skips.add(None, None, f"annotation record #{i}: no integer 'id' ({ann!r:.120})")
            continue
        image_id = ann.get("image_id")
        where = f"annotation {ann_id} (image {image_id})"
        if ann_id in seen_anns:
            skips.add(
                image_id if _is_int(image_id) else None,
                ann_id,
                f"{where}: duplicate annotation id (record #{i}); the first is kept",
            )
            continue
        seen_anns.add(ann_id)
        if not _is_int(image_id):
            skips.add(
                None,
                ann_id,
                f"annotation {ann_id}: 'image_id' is {image_id!r}, expected an integer",
            )
            continue
        if image_id in bad_images:
            dropped_with_image[image_id] = dropped_with_image.get(image_id, 0) + 1
            continue
        if image_id not in images:
            skips.add(image_id, ann_id, f"{where}: image id {image_id} is not in the JSON's images")
            continue
        cat = ann.get("category_id")
        if cat not in cat_ids or not _is_int(cat):
            known = sorted(cat_ids)
            shown = known if len(known) <= 12 else known[:12] + ["..."]
            skips.add(
                image_id,
                ann_id,
                f"{where}: unknown category id {cat!r} (the JSON's categories are {shown})",
            )
            continue
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):
            skips.add(image_id, ann_id, f"{where}: iscrowd is {crowd!r}, expected 0 or 1")
            continue
        by_image.setdefault(image_id, []).append(ann)

    # Bad image records are reported in id order, with the annotations that go with them.
    for image_id in sorted(bad_images):
        n = dropped_with_image.get(image_id, 0)
        suffix = f" ({n} annotation{'s' * (n != 1)} dropped with it)" if n else ""
        skips.add(image_id, None, bad_images[image_id] + suffix)

    ordered = [images[k] for k in sorted(images)]
    return CocoSource(
        path=path.resolve(),
        sha256=sha,
        kind=kind,
        categories=categories,
        images=ordered,
        annotations={k: by_image.get(k, []) for k in sorted(images)},
        skipped=skips.records,
        num_source_images=len(data["images"]),
        num_source_annotations=len(anns),
    )


# ----------------------------------------------------------------------------- geometry


def _rle_string_counts(s: str) -> list[int]:
    """Decodes COCO's compressed RLE string (pycocotools' rleFrString) into run lengths, so a
    malformed string is caught here instead of corrupting memory in the C decoder."""
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("the counts string ends inside a number")
            c = ord(s[p]) - 48
            if c < 0 or c > 63:
                raise ValueError(f"character {s[p]!r} is not valid in compressed RLE")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def segmentation_to_rle(
    seg: Any, height: int, width: int
) -> tuple[dict[str, Any] | None, str | None]:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) of an image of the given
    size -> (compressed RLE with str counts, None) or (None, what is wrong with it)."""
    if isinstance(seg, list):
        if not seg:
            return None, "empty polygon (no rings)"
        for k, ring in enumerate(seg):
            if not isinstance(ring, list) or not all(is_finite_number(v) for v in ring):
                return None, f"degenerate polygon: ring {k} is not a list of finite numbers"
            if len(ring) < 6 or len(ring) % 2:
                return None, (
                    f"degenerate polygon: ring {k} has {len(ring)} coordinates "
                    "(a polygon needs an even number, at least 6: three points)"
                )
        rle = mask_utils.merge(
            mask_utils.frPyObjects([[float(v) for v in r] for r in seg], height, width)
        )
        if mask_utils.area(rle) == 0:
            return None, "degenerate polygon: it covers no pixel"
    elif isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return None, f"RLE 'size' is {size!r}, expected [height, width]"
        if list(size) != [height, width]:
            return None, f"RLE size {size} differs from the image's [{height}, {width}]"
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts):
                return None, "uncompressed RLE 'counts' must be non-negative integers"
            total = sum(counts)
            if total != height * width:
                return (
                    None,
                    f"uncompressed RLE counts sum to {total}, expected {height}x{width} = {height * width}",
                )
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        elif isinstance(counts, str):
            try:
                runs = _rle_string_counts(counts)
            except ValueError as e:
                return None, f"malformed compressed RLE: {e}"
            if any(v < 0 for v in runs) or sum(runs) != height * width:
                return (
                    None,
                    f"malformed compressed RLE: runs sum to {sum(runs)}, expected {height * width}",
                )
            rle = {"size": [height, width], "counts": counts.encode("ascii")}
        else:
            return None, "RLE 'counts' is neither a list nor a string"
        if mask_utils.area(rle) == 0:
            return None, "empty mask: the RLE covers no pixel"
    elif seg is None:
        return None, "no 'segmentation'"
    else:
        return None, f"'segmentation' is a {type(seg).__name__}, neither polygons nor RLE"
    counts = rle["counts"]
    return {
        "size": [height, width],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }, None


def box_problem(bbox: Any, height: int, width: int) -> str | None:
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_finite_number(v) for v in bbox)):
        return f"'bbox' is {bbox!r:.80}, expected [x, y, width, height]"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"degenerate box {bbox} (width and height must be > 0)"
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"box {bbox} [x, y, w, h] lies outside the {width}x{height} image"
    return None


# ----------------------------------------------------------------------------- images


def read_image_file(path: Path) -> tuple[bytes, str, int, int]:
    """(bytes as stored, format, height, width); raises OSError / ValueError for a missing,
    truncated or corrupt file. Decodes the whole image: a truncated JPEG fails only then."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        fmt = (im.format or "").lower()
        im.load()
        width, height = im.size
    return data, fmt, height, width


def _image_problem_on_disk(path: Path) -> tuple[tuple[bytes, str, int, int] | None, str | None]:
    if not path.is_file():
        return None, f"image file not found: {path}"
    try:
        return read_image_file(path), None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return (
            None,
            f"cannot decode the image file {path} (truncated or corrupt: {type(e).__name__}: {e})",
        )


# ----------------------------------------------------------------------------- shards


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
    skips = _Skips(task.strict)
    cols: dict[str, list[Any]] = {f.name: [] for f in schema.SHARD_SCHEMA}
    images_dir = Path(task.images_dir)
    for rec, anns in zip(task.images, task.annotations):
        image_id, h, w = rec["id"], rec["height"], rec["width"]
        where = f"image {image_id} ({rec['file_name']})"
        dropped = (
            f" ({len(anns)} annotation{'s' * (len(anns) != 1)} dropped with it)" if anns else ""
        )
        loaded, problem = _image_problem_on_disk(images_dir / rec["file_name"])
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


def _shard_meta(path: Path) -> dict[str, Any] | None:
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


# ----------------------------------------------------------------------------- driver


@dataclass
class PrepareResult:
    out_dir: Path
    manifest: dict[str, Any]
    shards_written: int
    shards_kept: int

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return self.manifest["skipped"]


@contextmanager
def _lock(out_dir: Path) -> Iterator[None]:
    with open(out_dir / _LOCK_NAME, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise DataError(f"{out_dir}: another `data prepare` is writing to this folder") from e
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _fingerprint(source: CocoSource, shard_size: int, index: int, stats: Sequence[Any]) -> str:
    h = hashlib.sha256()
    head = {
        "format": FORMAT_VERSION,
        "source": source.sha256,
        "shard_size": shard_size,
        "index": index,
        "box_tolerance": BOX_TOLERANCE,
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    h.update(json.dumps(list(stats)).encode())
    return h.hexdigest()


def _file_stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def prepare(
    coco_json: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    shard_size: int = DEFAULT_SHARD_SIZE,
    strict: bool = False,
    workers: int | None = None,
    progress: bool | Callable[[int], None] = False,
) -> PrepareResult:
    """Writes (or completes) the shards and manifest of a COCO set in `out_dir`.

    `workers`: processes writing shards (None: the CPU count; 1: inline). `progress`: True for a
    tqdm bar, or a callback given the number of images each finished shard accounts for.
    Raises `DataError` for a missing/malformed JSON or images folder, and (strict) at the first
    bad record; shards finished before that are kept."""
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    images_dir = Path(images_dir).resolve()
    out_dir = Path(out_dir).resolve()
    source = read_coco(coco_json, strict=strict)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: images folder not found")
    out_dir.mkdir(parents=True, exist_ok=True)

    with _lock(out_dir):
        for p in out_dir.iterdir():  # leftovers of a killed run
            if _TMP_RE.match(p.name):
                p.unlink(missing_ok=True)
        n = len(source.images)
        num_shards = max(1, math.ceil(n / shard_size))
        tasks, kept = [], []
        for i in range(num_shards):
            recs = source.images[i * shard_size : (i + 1) * shard_size]
            stats = [_file_stat(images_dir / r["file_name"]) for r in recs]
            task = ShardTask(
                index=i,
                out_dir=str(out_dir),
                images_dir=str(images_dir),
                images=recs,
                annotations=[source.annotations[r["id"]] for r in recs],
                fingerprint=_fingerprint(source, shard_size, i, stats),
                strict=strict,
            )
            meta = _shard_meta(out_dir / task.file)
            # A strict run does not accept a shard an earlier run wrote around bad records.
            complete = meta is not None and meta.get("fingerprint") == task.fingerprint
            if complete and not (strict and meta["skipped"]):
                kept.append(
                    ShardResult(
                        i,
                        task.file,
                        int(meta["images"]),
                        int(meta["annotations"]),
                        list(meta["skipped"]),
                        written=False,
                    )
                )
            else:
                tasks.append(task)
        # Shards of an earlier, larger plan are not part of this set.
        stale = [
            p
            for p in out_dir.iterdir()
            if (m := _SHARD_RE.match(p.name)) and int(m.group(1)) >= num_shards
        ]
        manifest_path = out_dir / schema.MANIFEST_NAME
        if (tasks or stale) and manifest_path.exists():
            manifest_path.unlink()  # about to change shards: no manifest until all agree again
        for p in stale:
            p.unlink()

        done = list(kept)
        bar, callback = _progress(progress, total=n)
        try:
            for r in kept:
                callback(_planned(source, shard_size, r.index))
            for r in _run_tasks(tasks, workers):
                done.append(r)
                callback(_planned(source, shard_size, r.index))
        finally:
            if bar is not None:
                bar.close()

        done.sort(key=lambda r: r.index)
        manifest = {
            "version": schema.MANIFEST_VERSION,
            "kind": source.kind,
            "source": {
                "json": str(source.path),
                "sha256": source.sha256,
                "images_dir": str(images_dir),
            },
            "categories": source.categories,
            "shard_size": shard_size,
            "shards": [
                {"file": r.file, "images": r.images, "annotations": r.annotations} for r in done
            ],
            "num_images": sum(r.images for r in done),
            "num_annotations": sum(r.annotations for r in done),
            "skipped": source.skipped + [s for r in done for s in r.skipped],
        }
        write_manifest(out_dir, manifest)
    return PrepareResult(out_dir, manifest, shards_written=len(tasks), shards_kept=len(kept))


def _planned(source: CocoSource, shard_size: int, index: int) -> int:
    return len(source.images[index * shard_size : (index + 1) * shard_size])


def _progress(progress: bool | Callable[[int], None], total: int):
    if callable(progress):
        return None, progress
    if not progress:
        return None, lambda k: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="prepare", dynamic_ncols=True)
    return bar, bar.update


def _run_tasks(tasks: list[ShardTask], workers: int | None) -> Iterator[ShardResult]:
    """Runs the shard tasks, yielding results as they finish. On an error (a strict failure or a
    bug), pending tasks are cancelled, running ones finish (their shards are kept), then it
    re-raises."""
    if not tasks:
        return
    if workers is None and sum(len(t.images) for t in tasks) < _INLINE_BELOW:
        workers = 1  # starting processes costs more than a small set takes
    workers = min(len(tasks), workers or os.cpu_count() or 1)
    if workers <= 1:
        for t in tasks:
            yield write_shard(t)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may run Ray threads
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    try:
        futures = [pool.submit(write_shard, t) for t in tasks]
        for fut in cf.as_completed(futures):
            yield fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def summary(result: PrepareResult, max_reasons: int = 20) -> str:
    """The text `data prepare` prints: shards, images, annotations, skipped records and why."""
    m = result.manifest
    lines = [
        f"{result.out_dir}: {len(m['shards'])} shards ({result.shards_written} written, "
        f"{result.shards_kept} already complete), {m['num_images']} images, "
        f"{m['num_annotations']} annotations ({m['kind']})",
    ]
    skipped = m["skipped"]
    if skipped:
        lines.append(
            f"skipped {len(skipped)} bad record(s) (all listed in {schema.MANIFEST_NAME}):"
        )
        lines += [f"  - {s['reason']}" for s in skipped[:max_reasons]]
        if len(skipped) > max_reasons:
            lines.append(f"  ... and {len(skipped) - max_reasons} more")
    else:
        lines.append("no bad records")
    return "\n".join(lines)


__all__ = [
    "BOX_TOLERANCE",
    "CocoSource",
    "DEFAULT_SHARD_SIZE",
    "DataError",
    "PrepareResult",
    "load_coco_json",
    "prepare",
    "read_coco",
    "segmentation_to_rle",
    "summary",
]

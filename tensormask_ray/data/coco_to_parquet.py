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

This module is the resumable driver; the JSON's checks are in `coco_records`, the geometry's in
`coco_geometry`, the image files' in `image_files`, and one shard's rows and file in
`shard_writer`.
"""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import schema
from .coco_geometry import BOX_TOLERANCE
from .coco_records import CocoSource, read_coco
from .errors import DataError
from .manifest import write_manifest
from .shard_writer import FORMAT_VERSION, ShardResult, ShardTask, shard_meta, write_shard

DEFAULT_SHARD_SIZE = 256
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")
_TMP_RE = re.compile(r"^\.shard-\d{5,}\.parquet\..*\.tmp$")
_LOCK_NAME = ".prepare.lock"
_INLINE_BELOW = 200  # images: with workers=None, fewer than this are written without a pool


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
            meta = shard_meta(out_dir / task.file)
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


__all__ = ["DEFAULT_SHARD_SIZE", "PrepareResult", "prepare", "summary"]

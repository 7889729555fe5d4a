"""Batch inference over many images: one model per Ray Data actor, results streamed to a JSONL log
as they arrive, so an interrupted run resumes where it stopped.

    source (shards | image files) -> [skip ids already in the log] -> map_batches(Predictor,
    ActorPoolStrategy(size=N)) -> driver appends one JSON line per image -> COCO results

The per-image work is `Predictor.predict_one`: read, decode, `predict_image` (shorter side to
`input.min_size_test`, the image alone in its batch, predictions at the image's own size),
`predictions_to_coco`. The same method runs in the actors and in-process (`num_actors=0`), and it
is `evaluator.predict_image` underneath, so batch, single-process and single-image inference
give the same detections. Batching only groups images per actor call; every image is still run
alone (its own padding), since padding a batch to its largest image would change the features
near the borders and hence the detections.

The log (`predictions.jsonl` in the output folder):

    line 1: {"header": {...}}  checkpoint, inference settings, category ids, data source
    then  : {"image_id", "file_name", "height", "width", "error", "seconds", "results": [...]}

one line per image, written and flushed as each arrives: a complete line is a finished image.
On resume, a torn last line (a run killed mid-write) is cut off, the images with a complete
successful line are skipped (filtered out before inference: their shards are not even read), and
images that failed (undecodable) are tried again. A log written with another checkpoint or other
inference settings is refused rather than mixed (`overwrite=True` starts afresh).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.transforms import decode_image
from ..errors import UserError
from ..train.checkpoint import state_path
from .coco import describe_ids, predictions_to_coco
from .evaluator import predict_image

LOG_NAME = "predictions.jsonl"
LOG_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModelSpec:
    """What each actor loads: a checkpoint (folder or state.pt), dotted config overrides (the
    test-time options), the device, and the COCO category id of each class index."""

    checkpoint: str
    category_ids: tuple[int, ...]
    overrides: tuple[tuple[str, Any], ...] = ()
    device: str = "cpu"

    def load(self):
        """(model in eval mode, Config, categories); UserError naming mismatched weight keys."""
        from ..train.checkpoint import load_model_for_inference

        return load_model_for_inference(self.checkpoint, dict(self.overrides), self.device)


class Predictor:
    """The Ray Data callable class: loads the model once, then maps batches of rows
    {"image_id", "file_name", "image_bytes" | "path"} to one record per image (see `predict_one`).

    num_threads > 0 sets torch's intra-op threads (an actor uses as many as it has CPUs: more
    threads than cores slows a shared CPU down many times over). `loaded`: a (model, cfg) pair
    already loaded from `spec`, for the in-process path."""

    def __init__(self, spec: ModelSpec, num_threads: int = 0, loaded: tuple | None = None):
        import torch

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.model, self.cfg = loaded if loaded is not None else spec.load()[:2]
        self.category_ids = list(spec.category_ids)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        data = batch.get("image_bytes")
        paths = batch.get("path")
        records = [
            self.predict_one(
                int(batch["image_id"][i]),
                str(batch["file_name"][i]),
                data=None if data is None else data[i],
                path=None if paths is None else str(paths[i]),
            )
            for i in range(n)
        ]
        return {
            "image_id": np.array([r["image_id"] for r in records], dtype=np.int64),
            "file_name": np.array([r["file_name"] for r in records], dtype=object),
            "height": np.array([r["height"] for r in records], dtype=np.int64),
            "width": np.array([r["width"] for r in records], dtype=np.int64),
            "error": np.array([r["error"] for r in records], dtype=object),
            "seconds": np.array([r["seconds"] for r in records], dtype=np.float64),
            "results": np.array([r["results"] for r in records], dtype=object),
        }

    def predict_one(
        self, image_id: int, file_name: str, data: bytes | None = None, path: str | None = None
    ) -> dict[str, Any]:
        """One image -> {"image_id", "file_name", "height", "width", "error" ("" when fine),
        "seconds", "results" (the COCO result dicts as a JSON string)}. An image that cannot be
        read or decoded gives a record with the reason in "error", never an exception."""
        t0 = time.perf_counter()
        try:
            if data is None:
                data = Path(path).read_bytes()
            image = decode_image(bytes(data))  # (H, W, 3) uint8
        except Exception as e:  # noqa: BLE001 - whatever fails here is the file's fault
            error = f"cannot read or decode the image ({_reason(e)})"
            return _record(image_id, file_name, 0, 0, error, t0, "[]")
        prediction = predict_image(self.model, image, self.cfg)
        results = predictions_to_coco(prediction, image_id, self.category_ids)
        h, w = image.shape[:2]
        return _record(
            image_id, file_name, h, w, "", t0, json.dumps(results, separators=(",", ":"))
        )


def _reason(e: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image format Pillow can read, or a damaged header"
    if isinstance(e, FileNotFoundError):
        return "no such file"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _record(image_id, file_name, h, w, error, t0, results_json) -> dict[str, Any]:
    return {
        "image_id": int(image_id),
        "file_name": file_name,
        "height": int(h),
        "width": int(w),
        "error": error,
        "seconds": time.perf_counter() - t0,
        "results": results_json,
    }


# ----------------------------------------------------------------------------- image sources
class ShardSource:
    """The images of a shards folder (`data prepare`), read with `ray.data.read_parquet`."""

    def __init__(self, shards_dir: str | Path):
        from ..data.manifest import read_manifest, shard_paths

        self.shards_dir = Path(shards_dir).resolve()
        self.manifest = read_manifest(self.shards_dir)
        self.paths = shard_paths(self.shards_dir, self.manifest)
        self._ids: list[list[int]] | None = None

    def describe(self) -> str:
        return f"shards {self.shards_dir}"

    def shard_image_ids(self) -> list[list[int]]:
        """The image ids of each shard (the id column only is read), in file order."""
        if self._ids is None:
            import pyarrow.parquet as pq

            self._ids = [
                [int(i) for i in pq.read_table(p, columns=["image_id"]).column(0).to_pylist()]
                for p in self.paths
            ]
        return self._ids

    def image_ids(self) -> list[int]:
        return [i for ids in self.shard_image_ids() for i in ids]

    def iter_rows(self, pending: set[int]) -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq

        for path, ids in zip(self.paths, self.shard_image_ids()):
            if pending.isdisjoint(ids):
                continue
            table = pq.read_table(path, columns=["image_id", "file_name", "image_bytes"])
            for row in table.to_pylist():
                if row["image_id"] in pending:
                    yield row

    def dataset(self, pending: set[int]):
        """A Ray dataset of the pending images' rows {image_id, file_name, image_bytes}: shards
        without a pending image are not read, finished rows of the others are dropped."""
        import ray

        from ..data.dataset import _parquet_reader_v1

        chosen = [
            (str(p), ids)
            for p, ids in zip(self.paths, self.shard_image_ids())
            if not pending.isdisjoint(ids)
        ]
        # Reading and filtering are I/O: they ask for no CPU, so that an actor pool holding every
        # CPU of the cluster (2 actors on this 2-core machine) cannot starve them forever.
        with _parquet_reader_v1():
            ds = ray.data.read_parquet(
                [p for p, _ in chosen], override_num_blocks=len(chosen), num_cpus=0
            )
        ds = ds.select_columns(["image_id", "file_name", "image_bytes"])
        if any(not pending.issuperset(ids) for _, ids in chosen):
            ds = ds.map_batches(
                _keep_rows, fn_kwargs={"keep": np.array(sorted(pending), dtype=np.int64)},
                batch_format="pyarrow", batch_size=None, num_cpus=0,
            )  # fmt: skip
        return ds


def _keep_rows(table, keep: np.ndarray):
    """The rows of a pyarrow table whose image_id is in `keep`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return table.filter(pc.is_in(table["image_id"], value_set=pa.array(keep)))


@dataclass
class FileSource:
    """Image files, each with an image id: the images of a COCO json (or image-info json) found
    in an images folder, or files given on the command line (ids 0, 1, ...). Actors read the
    files themselves, so on a cluster the paths must be on a shared filesystem."""

    items: list[tuple[int, str, str]]  # (image_id, file_name, absolute path)
    description: str = "image files"

    @classmethod
    def from_coco(cls, coco, images_dir: str | Path) -> FileSource:
        images_dir = Path(images_dir).resolve()
        if not images_dir.is_dir():
            raise UserError(f"--images-dir {images_dir}: no such folder")
        items = [
            (int(img["id"]), str(img["file_name"]), str(images_dir / img["file_name"]))
            for img in sorted(coco.dataset["images"], key=lambda im: im["id"])
        ]
        return cls(items, f"images {images_dir}")

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path]) -> FileSource:
        items = [(i, str(p), str(Path(p).resolve())) for i, p in enumerate(paths)]
        return cls(
            items,
            "files " + ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else ""),
        )

    def describe(self) -> str:
        return self.description

    def image_ids(self) -> list[int]:
        return [i for i, _, _ in self.items]

    def iter_rows(self, pending: set[int]) -> Iterator[dict[str, Any]]:
        for image_id, name, path in self.items:
            if image_id in pending:
                yield {"image_id": image_id, "file_name": name, "path": path}

    def dataset(self, pending: set[int]):
        import ray

        return ray.data.from_items(list(self.iter_rows(pending)))


def image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files given on the command line, folders expanded to their image files (sorted, not
    recursive). A file given by name is kept whatever its extension (so an undecodable one is
    reported); a path that does not exist is a UserError."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                raise UserError(
                    f"{p}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder"
                )
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: no such file or folder")
    return files


# ----------------------------------------------------------------------------- the log
class ResultLog:
    """The append-only JSONL log of per-image records (format in the module docstring)."""

    def __init__(self, path: str | Path, header: dict[str, Any], overwrite: bool = False):
        self.path = Path(path)
        self.header = {"version": LOG_VERSION, **header}
        # image id -> (line number of its latest record, ok, file_name, error)
        self.entries: dict[int, tuple[int, bool, str, str]] = {}
        self._lines = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite or not self.path.exists() or not self._load():
            self._start()
        self._file = self.path.open("a")

    def _start(self) -> None:
        with self.path.open("w") as f:
            f.write(json.dumps({"header": self.header}, sort_keys=True) + "\n")
        self.entries, self._lines = {}, 1

    def _load(self) -> bool:
        """Reads an existing log; False if it holds nothing worth keeping (not even a header)."""
        _truncate_torn_line(self.path)
        with self.path.open() as f:
            first = f.readline()
            if not first:
                return False
            try:
                stored = json.loads(first)["header"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{self.path}: not a prediction log of this program ({e})") from e
            if stored != json.loads(json.dumps(self.header)):
                changed = sorted(
                    k for k in set(stored) | set(self.header) if stored.get(k) != self.header.get(k)
                )
                raise UserError(
                    f"{self.path} holds predictions made with other settings (different: "
                    f"{', '.join(changed)}); pass --overwrite to start again, or choose another --out"
                )
            line_no = 1
            for line_no, line in enumerate(f, start=2):
                try:
                    rec = json.loads(line)
                    self.entries[int(rec["image_id"])] = (
                        line_no,
                        not rec["error"],
                        rec["file_name"],
                        rec["error"],
                    )
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise UserError(f"{self.path}, line {line_no}: damaged record ({e})") from e
            self._lines = line_no
        return True

    @property
    def done_ids(self) -> set[int]:
        """Images with a successful record: not run again."""
        return {i for i, (_, ok, _, _) in self.entries.items() if ok}

    def failures(self, image_ids: Iterable[int] | None = None) -> dict[int, tuple[str, str]]:
        """{image_id: (file_name, error)} of the images whose latest record is a failure."""
        wanted = None if image_ids is None else set(image_ids)
        return {
            i: (name, error)
            for i, (_, ok, name, error) in self.entries.items()
            if not ok and (wanted is None or i in wanted)
        }

    def append(self, record: dict[str, Any]) -> None:
        """One image's record (as `Predictor.predict_one` returns it), written and flushed."""
        meta = {
            k: record[k] for k in ("image_id", "file_name", "height", "width", "error", "seconds")
        }
        meta = {**meta, "image_id": int(meta["image_id"]), "height": int(meta["height"]),
                "width": int(meta["width"]), "seconds": round(float(meta["seconds"]), 4)}  # fmt: skip
        # The results are already JSON (made in the actor): splice them in rather than re-encode.
        line = json.dumps(meta)[:-1] + ', "results": ' + record["results"] + "}\n"
        self._file.write(line)
        self._file.flush()
        self._lines += 1
        self.entries[meta["image_id"]] = (
            self._lines,
            not meta["error"],
            meta["file_name"],
            meta["error"],
        )

    def iter_results(self, image_ids: Iterable[int] | None = None) -> Iterator[dict]:
        """The COCO result dicts of the latest successful record of each image (of `image_ids`
        if given), read back from the file: a generator, nothing held."""
        wanted = None if image_ids is None else set(image_ids)
        final = {
            line: i
            for i, (line, ok, _, _) in self.entries.items()
            if ok and (wanted is None or i in wanted)
        }
        self._file.flush()
        with self.path.open() as f:
            for line_no, line in enumerate(f, start=1):
                if line_no in final:
                    yield from json.loads(line)["results"]

    def iter_records(self, image_ids: Iterable[int] | None = None) -> Iterator[dict]:
        """The latest record of each image (all of it: meta, error and results)."""
        wanted = None if image_ids is None else set(image_ids)
        final = {
            line for i, (line, _, _, _) in self.entries.items() if wanted is None or i in wanted
        }
        self._file.flush()
        with self.path.open() as f:
            for line_no, line in enumerate(f, start=1):
                if line_no in final:
                    yield json.loads(line)

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self) -> ResultLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _truncate_torn_line(path: Path) -> None:
    """Cuts a last line without its newline (a write interrupted by a kill)."""
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        block = 1 << 16
        end = size
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                f.truncate(start + nl + 1)
                return
            end = start
        f.truncate(0)


# ----------------------------------------------------------------------------- the driver
@dataclass
class InferenceOutcome:
    image_ids: list[int]  # the images asked for
    done_ids: set[int]  # those with detections (now or from an earlier run)
    failures: dict[int, tuple[str, str]]  # image_id -> (file_name, error), latest attempt
    resumed: int  # images skipped because an earlier run finished them
    processed: int  # images run now (including failures)
    seconds: float  # wall time of the inference
    log: ResultLog = field(repr=False)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def run_inference(
    source,
    spec: ModelSpec,
    log: ResultLog,
    image_ids: Sequence[int] | None = None,
    *,
    num_actors: int = 1,
    batch_size: int = 4,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    strict: bool = False,
    address: str | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    loaded: tuple | None = None,
) -> InferenceOutcome:
    """Runs the model over the images of `source` (all, or `image_ids`) not yet in `log`,
    appending each image's record as it arrives. num_actors=0 runs in this process, without Ray;
    N >= 1 uses a Ray Data actor pool of N (starting a local Ray, or joining `address`, if Ray
    is not up). strict: the first image that cannot be decoded raises UserError (after its
    record is logged). on_record(record) is called after each record is logged.

    Load the model in the driver first (`spec.load()`), so that a checkpoint that does not match
    its config fails here with the keys named, not inside an actor; pass the (model, cfg) as
    `loaded` and the in-process path uses it instead of loading again."""
    wanted = list(source.image_ids() if image_ids is None else image_ids)
    done_before = log.done_ids
    pending = set(wanted) - done_before
    resumed = len(set(wanted) & done_before)
    processed = 0
    t0 = time.perf_counter()

    def consume(record: dict[str, Any]) -> None:
        nonlocal processed
        log.append(record)
        processed += 1
        if strict and record["error"]:
            raise UserError(f"{record['file_name']}: {record['error']} (--strict: stopped here)")
        if on_record is not None:
            on_record(record)

    if pending and num_actors <= 0:
        predictor = Predictor(spec, loaded=loaded)
        for row in source.iter_rows(pending):
            consume(
                predictor.predict_one(
                    row["image_id"], row["file_name"], row.get("image_bytes"), row.get("path")
                )
            )
    elif pending:
        batches = _ray_batches(
            source, spec, pending, num_actors, batch_size, cpus_per_actor, gpus_per_actor, address
        )
        with contextlib.closing(batches):  # an exception here stops the pipeline at once
            for batch in batches:
                for i in range(len(batch["image_id"])):
                    consume({key: values[i] for key, values in batch.items()})

    missing = pending - log.done_ids - set(log.failures())
    if missing:  # every pending image must come back, as detections or as an error
        raise RuntimeError(
            f"{len(missing)} images were sent but never came back: {describe_ids(missing)}"
        )
    return InferenceOutcome(
        image_ids=wanted,
        done_ids=log.done_ids & set(wanted),
        failures=log.failures(wanted),
        resumed=resumed,
        processed=processed,
        seconds=time.perf_counter() - t0,
        log=log,
    )


def _ray_batches(
    source, spec, pending, num_actors, batch_size, cpus_per_actor, gpus_per_actor, address
):
    """The output batches of the actor pool, as they complete (numpy dicts)."""
    import ray

    from ..capacity import check_capacity, inference_reservation
    from ..console import ensure_ray, quiet_ray_data

    # Ray Data's re-blocking step (below) is a task that asks for one CPU, which Ray Data offers
    # no way to lower: if the actors held every CPU it would wait forever. A local Ray started
    # here gets at least one logical CPU more than the actors need (the step is light); on a
    # cluster with no CPU to spare, check_capacity fails at once.
    ensure_ray(address, needed_cpus=num_actors * cpus_per_actor + 1)
    check_capacity(
        inference_reservation(num_actors, cpus_per_actor, gpus_per_actor), "batch inference"
    )
    remote_args: dict[str, Any] = {"num_cpus": cpus_per_actor}
    if gpus_per_actor > 0:
        remote_args["num_gpus"] = gpus_per_actor
    with quiet_ray_data():  # our own progress lines print meanwhile
        # Blocks of `batch_size` rows: a task takes whole blocks, so a shard read as one block
        # would go to one actor in one piece, and its results would come back in one piece.
        ds = source.dataset(pending).repartition(target_num_rows_per_block=batch_size)
        ds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={"spec": spec, "num_threads": max(1, int(cpus_per_actor))},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            **remote_args,
        )
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)


def log_header(spec: ModelSpec, cfg, source_description: str) -> dict[str, Any]:
    """What must match for a log to be resumed: the checkpoint (path, size, modification time),
    the test-time settings, the class -> category id map and the data."""
    path = Path(spec.checkpoint).resolve()
    state = state_path(path)
    stat = state.stat() if state.is_file() else None
    return {
        "checkpoint": str(path),
        "checkpoint_file": [stat.st_size, stat.st_mtime_ns] if stat else None,
        "inference": dict(sorted(vars(cfg.inference).items())),
        "test_size": [cfg.input.min_size_test, cfg.input.max_size_test],
        "category_ids": list(spec.category_ids),
        "data": source_description,
    }


__all__ = [
    "FileSource",
    "InferenceOutcome",
    "ModelSpec",
    "Predictor",
    "ResultLog",
    "ShardSource",
    "image_files",
    "log_header",
    "run_inference",
]

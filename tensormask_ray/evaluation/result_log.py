"""The prediction log of batch inference (`predictions.jsonl` in the output folder): results
streamed to a JSONL file as they arrive, so an interrupted run resumes where it stopped.

    line 1: {"header": {...}}  checkpoint, inference settings, category ids, data source
    then  : {"image_id", "file_name", "height", "width", "error", "seconds", "results": [...]}

one line per image, written and flushed as each arrives: a complete line is a finished image.
On resume, a torn last line (a run killed mid-write) is cut off, the images with a complete
successful line are skipped (filtered out before inference: their shards are not even read), and
images that failed (undecodable) are tried again. A log written with another checkpoint or other
inference settings is refused rather than mixed (`overwrite=True` starts afresh).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..modeling.checkpoint_file import state_path

if TYPE_CHECKING:
    from .predictor import ModelSpec

LOG_NAME = "predictions.jsonl"
LOG_VERSION = 1


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


__all__ = ["LOG_NAME", "LOG_VERSION", "ResultLog", "log_header"]

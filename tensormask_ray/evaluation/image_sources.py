"""Where batch inference reads its images from: a shards folder (`ShardSource`) or image files
(`FileSource`). Each gives the image ids, the rows of the pending images in-process
(`iter_rows`), and a Ray dataset of them (`dataset`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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


__all__ = ["IMAGE_EXTENSIONS", "FileSource", "ShardSource", "image_files"]

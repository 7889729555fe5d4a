"""A COCO instances or image-info JSON, structurally checked (`read_coco` -> `CocoSource`), and
the skipped-record list every check of `data prepare` adds to (`Skips`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..finite import is_int
from .coco_io import load_coco_json
from .errors import DataError


def skip_record(image_id: int | None, ann_id: int | None, reason: str) -> dict[str, Any]:
    return {"image_id": image_id, "ann_id": ann_id, "reason": reason}


class Skips:
    """Collects skipped records; in strict mode the first one raises `DataError`."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.records: list[dict[str, Any]] = []

    def add(self, image_id: int | None, ann_id: int | None, reason: str) -> None:
        if self.strict:
            raise DataError(reason)
        self.records.append(skip_record(image_id, ann_id, reason))


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
        if not isinstance(c, dict) or not is_int(c.get("id")) or not isinstance(c.get("name"), str):
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
        if not is_int(rec.get(key)) or rec[key] <= 0:
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
    skips = Skips(strict)

    images: dict[int, dict[str, Any]] = {}
    bad_images: dict[int, str] = {}
    for i, rec in enumerate(data["images"]):
        image_id = rec.get("id") if isinstance(rec, dict) else None
        if not is_int(image_id):
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
        if not is_int(ann_id):
            skips.add(None, None, f"annotation record #{i}: no integer 'id' ({ann!r:.120})")
            continue
        image_id = ann.get("image_id")
        where = f"annotation {ann_id} (image {image_id})"
        if ann_id in seen_anns:
            skips.add(
                image_id if is_int(image_id) else None,
                ann_id,
                f"{where}: duplicate annotation id (record #{i}); the first is kept",
            )
            continue
        seen_anns.add(ann_id)
        if not is_int(image_id):
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
        if cat not in cat_ids or not is_int(cat):
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


__all__ = ["CocoSource", "Skips", "read_coco", "skip_record"]

"""Writing a small COCO set to disk (images folder + instances JSON), shared by the dataset
makers `synth.py` and `imgviz_set.py`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .errors import DataError
from .manifest import atomic_write_bytes

JSON_NAME = "instances.json"
IMAGES_DIR = "images"


class CocoFiles(NamedTuple):
    """Where a COCO set lies: its instances JSON and its images folder."""

    json: Path
    images_dir: Path


def load_coco_json(path: str | Path) -> tuple[dict[str, Any], str]:
    """(the parsed JSON object, its sha256). A missing or malformed file is a `DataError` in any
    mode: without a readable JSON there is nothing to skip to."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: COCO JSON file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the COCO JSON ({e})") from e
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: malformed JSON, not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from e
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: malformed COCO JSON: expected an object, got {type(data).__name__}"
        )
    return data, hashlib.sha256(raw).hexdigest()


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Binary (H, W) mask -> COCO compressed RLE with str counts (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """Binary (H, W) mask -> COCO uncompressed RLE (column-major run lengths, starting with 0s),
    the form COCO uses for crowd regions."""
    flat = np.asarray(mask, dtype=bool).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def annotation(
    ann_id: int,
    image_id: int,
    category_id: int,
    mask: np.ndarray,
    segmentation: Any,
    iscrowd: int = 0,
) -> dict[str, Any]:
    """A COCO annotation whose bbox and area are those of `mask` (what `segmentation` draws)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": int(ann_id),
        "image_id": int(image_id),
        "category_id": int(category_id),
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": int(iscrowd),
    }


def save_image(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    """RGB uint8 (H, W, 3) -> JPEG or PNG by the file's suffix (deterministic bytes)."""
    im = Image.fromarray(rgb)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.save(path, format="JPEG", quality=quality)
    else:
        im.save(path, format="PNG")


def write_coco_json(out_dir: Path, dataset: dict[str, Any]) -> Path:
    path = out_dir / JSON_NAME
    atomic_write_bytes(path, (json.dumps(dataset, separators=(",", ":")) + "\n").encode())
    return path

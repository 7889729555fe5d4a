"""Result files for the COCO evaluation server (test-dev has no public annotations).

The server takes a zip holding one json named `detections_<testset>_<alg>_results.json`: a list of
result dicts (image_id, category_id, bbox, score, segmentation as compressed RLE), the output of
`predictions_to_coco`. Images without any detection simply have no entry, so whether every image
was run cannot be read from the results; the caller passes the ids it processed, and the file is
written only if they cover the image-info file.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections import defaultdict
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ..errors import UserError
from ..finite import is_finite_number
from .coco import describe_ids, rle_areas
from .ground_truth import coco_gt_from_json

_ALG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")  # underscores separate the name's fields
_CHUNK = 4096  # results validated (with one pycocotools call) and written at a time


def results_file_name(name: str, testset: str = "test-dev2017") -> str:
    """`detections_test-dev2017_<name>_results.json`; `name` may use letters, digits, '.', '-'."""
    if not _ALG_NAME.fullmatch(name):
        raise UserError(
            f"result name {name!r}: use letters, digits, '.' and '-' only (the server splits the "
            "file name on '_')"
        )
    return f"detections_{testset}_{name}_results.json"


def write_test_dev_results(
    results: Iterable[dict],
    image_info_json: str | Path | COCO,
    out_dir: str | Path,
    name: str,
    processed_image_ids: Iterable[int],
    testset: str = "test-dev2017",
) -> tuple[Path, Path]:
    """Validate the results, write the json and a zip holding only it; returns (json, zip) paths.

    results: result dicts from `predictions_to_coco`, any iterable (a generator streams: results
    are validated and written a chunk at a time, never all held). image_info_json: the image-info
    file of the split (e.g. image_info_test-dev2017.json), or a COCO object made from it.
    processed_image_ids: every image the model was run on, with or without detections.

    Raises UserError, naming the first few offending ids and their count, when: an image of the
    image-info file was not processed; a processed or result image id is not in the image-info
    file; a category id is not among its categories; a bbox is not 4 finite numbers with w, h >= 0;
    a score is not finite; a segmentation is not a compressed RLE of its image's size (a dict with
    "size" [h, w] and str "counts", whose area and extent fit the image). Nothing is left behind
    when it raises.
    """
    info = (
        image_info_json if isinstance(image_info_json, COCO) else coco_gt_from_json(image_info_json)
    )
    source = "the image-info file" if isinstance(image_info_json, COCO) else str(image_info_json)
    sizes = {img_id: (int(img["height"]), int(img["width"])) for img_id, img in info.imgs.items()}
    category_ids = set(info.getCatIds())

    processed = {int(i) for i in processed_image_ids}
    not_processed = set(sizes) - processed
    if not_processed:
        raise UserError(
            f"{len(not_processed)} images of {source} were not processed: "
            f"{describe_ids(not_processed)}"
        )
    _raise_if_unknown("processed image ids", processed - set(sizes), source)

    file_name = results_file_name(name, testset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / file_name
    zip_path = json_path.with_suffix(".zip")
    tmp_path = json_path.with_name(json_path.name + ".tmp")
    problems: dict[str, set] = defaultdict(set)
    try:
        with tmp_path.open("w") as f:
            f.write("[")
            first = True
            iterator = iter(results)
            while chunk := list(islice(iterator, _CHUNK)):
                _validate_chunk(chunk, sizes, category_ids, problems)
                if problems:
                    continue  # keep reading, to report every problem and its count
                for result in chunk:
                    f.write(
                        ("" if first else ",")
                        + json.dumps(result, separators=(",", ":"), default=_plain)
                    )
                    first = False
            f.write("]")
        if problems:
            lines = [f"{what} ({len(ids)}): {describe_ids(ids)}" for what, ids in problems.items()]
            raise UserError(
                f"{json_path.name} not written; the results do not match {source}:\n  "
                + "\n  ".join(lines)
            )
        os.replace(tmp_path, json_path)
    finally:
        tmp_path.unlink(missing_ok=True)

    tmp_zip = zip_path.with_name(zip_path.name + ".tmp")
    with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(json_path, arcname=json_path.name)
    os.replace(tmp_zip, zip_path)
    return json_path, zip_path


def _raise_if_unknown(what: str, bad: set[int], source: str) -> None:
    if bad:
        raise UserError(f"{len(bad)} {what} are not in {source}: {describe_ids(bad)}")


def _validate_chunk(
    chunk: list[dict],
    sizes: dict[int, tuple[int, int]],
    category_ids: set[int],
    problems: dict[str, set],
) -> None:
    """Adds to problems[description] the image (or category) ids of the results that break a rule."""
    rles, rle_images = [], []
    for r in chunk:
        image_id = r.get("image_id")
        if image_id not in sizes:
            problems["image ids not in the image-info file"].add(image_id)
            continue
        if r.get("category_id") not in category_ids:
            problems["unknown category ids"].add(r.get("category_id"))
        if not is_finite_number(r.get("score")):
            problems["images with a missing or non-finite score"].add(image_id)
        box = r.get("bbox")
        if not (
            isinstance(box, (list, tuple, np.ndarray))
            and len(box) == 4
            and all(is_finite_number(v) for v in box)
            and box[2] >= 0
            and box[3] >= 0
        ):
            problems["images with a bbox not [x, y, w>=0, h>=0] of finite numbers"].add(image_id)
        segm = r.get("segmentation")
        h, w = sizes[image_id]
        if (
            isinstance(segm, dict)
            and isinstance(segm.get("counts"), str)
            and list(segm.get("size", ())) == [h, w]
        ):
            rles.append(segm)
            rle_images.append(image_id)
        else:
            problems["images with a segmentation not a compressed RLE of the image's size"].add(
                image_id
            )
    if not rles:
        return
    # A compressed RLE cannot fail to parse, but a corrupt one covers more than the image.
    areas = rle_areas(rles)  # (N,)
    boxes = mask_utils.toBbox(rles)  # (N, 4) xywh
    for image_id, area, box in zip(rle_images, areas, boxes):
        h, w = sizes[image_id]
        if area > h * w or box[0] + box[2] > w or box[1] + box[3] > h:
            problems["images with an RLE that does not fit the image"].add(image_id)


def _plain(value):
    """numpy scalars and arrays (as a hand-made result may hold) as JSON values."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")

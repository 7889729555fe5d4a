from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tensormask_ray.data import schema
from tensormask_ray.data.manifest import CategoryMap, read_manifest
from tensormask_ray.errors import UserError
from tensormask_ray.evaluation.coco import evaluate_coco, predictions_to_coco
from tensormask_ray.evaluation.ground_truth import (
    coco_gt_from_json,
    coco_gt_from_shards,
    instances_from_coco,
)

from .synthetic import CATEGORY_IDS, CATEGORY_MAP, CLASS_NAMES, coco_from_dataset


def write_shards(folder, dataset, images_per_shard=2):
    """Shards + manifest of `dataset` as `data prepare` writes them (schema.py)."""
    rows = []
    for image in dataset["images"]:
        anns = [a for a in dataset["annotations"] if a["image_id"] == image["id"]]
        png = io.BytesIO()
        Image.new("RGB", (image["width"], image["height"])).save(png, format="PNG")
        rows.append(
            {
                "image_id": image["id"],
                "file_name": image["file_name"],
                "height": image["height"],
                "width": image["width"],
                "image_bytes": png.getvalue(),
                "image_format": "png",
                "ann_ids": [a["id"] for a in anns],
                "category_ids": [a["category_id"] for a in anns],
                "boxes": [a["bbox"] for a in anns],
                "areas": [a["area"] for a in anns],
                "iscrowd": [bool(a["iscrowd"]) for a in anns],
                "rle_counts": [a["segmentation"]["counts"] for a in anns],
            }
        )
    shards = []
    for index, start in enumerate(range(0, len(rows), images_per_shard)):
        part = rows[start : start + images_per_shard]
        name = schema.SHARD_PATTERN.format(index=index)
        pq.write_table(pa.Table.from_pylist(part, schema=schema.SHARD_SCHEMA), folder / name)
        shards.append(
            {"file": name, "images": len(part), "annotations": sum(len(r["ann_ids"]) for r in part)}
        )
    manifest = {
        "version": schema.MANIFEST_VERSION,
        "kind": "instances",
        "source": {"json": "made-in-test.json", "sha256": "0" * 64, "images_dir": "images"},
        "categories": dataset["categories"],
        "shards": shards,
        "num_images": len(rows),
        "num_annotations": len(dataset["annotations"]),
        "skipped": [],
    }
    (folder / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    return manifest


def test_coco_gt_from_shards_rebuilds_the_ground_truth(tmp_path, dataset, coco_gt):
    write_shards(tmp_path, dataset[0])
    rebuilt = coco_gt_from_shards(tmp_path)
    assert sorted(rebuilt.getImgIds()) == sorted(coco_gt.getImgIds())
    assert rebuilt.loadCats(rebuilt.getCatIds()) == dataset[0]["categories"]
    for image_id, objs in dataset[1].items():
        info = rebuilt.imgs[image_id]
        assert (info["height"], info["width"], info["file_name"]) == (
            coco_gt.imgs[image_id]["height"], coco_gt.imgs[image_id]["width"], f"{image_id:012d}.jpg",
        )  # fmt: skip
        anns = rebuilt.loadAnns(rebuilt.getAnnIds(imgIds=[image_id]))
        assert [a["category_id"] for a in anns] == [c for c, _ in objs]
        for ann, (_, mask) in zip(anns, objs):
            np.testing.assert_array_equal(rebuilt.annToMask(ann), mask.astype(np.uint8))
            assert ann["iscrowd"] == 0 and ann["area"] == pytest.approx(mask.sum())
    # and it evaluates like the original: its own instances score AP 1
    results = []
    for image_id in rebuilt.getImgIds():
        prediction = instances_from_coco(rebuilt, image_id, CATEGORY_MAP)
        prediction["scores"] = prediction["labels"].new_ones(len(prediction["labels"])).float()
        results += predictions_to_coco(prediction, image_id, CATEGORY_IDS)
    metrics = evaluate_coco(rebuilt, results)
    assert metrics["segm/AP"] == pytest.approx(1.0) and metrics["bbox/AP"] == pytest.approx(1.0)


def test_manifest_problems_are_user_errors(tmp_path, dataset):
    with pytest.raises(UserError, match="manifest.json: no such file"):
        coco_gt_from_shards(tmp_path)
    manifest = write_shards(tmp_path, dataset[0])
    categories = CategoryMap.from_manifest(read_manifest(tmp_path))
    assert (list(categories.ids), list(categories.names)) == (CATEGORY_IDS, CLASS_NAMES)
    (tmp_path / manifest["shards"][1]["file"]).unlink()
    with pytest.raises(UserError, match="shard-00001.parquet: listed in .* but missing"):
        coco_gt_from_shards(tmp_path)
    (tmp_path / schema.MANIFEST_NAME).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(UserError, match="manifest version 99"):
        coco_gt_from_shards(tmp_path)
    (tmp_path / schema.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(UserError, match="not a readable JSON file"):
        coco_gt_from_shards(tmp_path)


def test_coco_gt_from_json(tmp_path, dataset):
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(dataset[0]))
    coco = coco_gt_from_json(path)
    assert len(coco.getAnnIds()) == len(dataset[0]["annotations"])
    info = tmp_path / "image_info.json"  # no "annotations": allowed
    info.write_text(json.dumps({k: dataset[0][k] for k in ("images", "categories")}))
    assert coco_gt_from_json(info).getAnnIds() == []

    with pytest.raises(UserError, match="missing.json: COCO JSON file not found"):
        coco_gt_from_json(tmp_path / "missing.json")
    path.write_text("[1, 2")
    with pytest.raises(UserError, match="instances_val.json: malformed JSON at line 1"):
        coco_gt_from_json(path)
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(UserError, match="instances_val.json: no 'images' list"):
        coco_gt_from_json(path)
    path.write_text(json.dumps({**dataset[0], "annotations": [{"id": 1}]}))
    with pytest.raises(UserError, match="instances_val.json: malformed COCO record"):
        coco_gt_from_json(path)


def test_instances_from_coco_skips_crowd_unless_asked(dataset):
    data = dataset[0]
    data["annotations"][0]["iscrowd"] = 1  # image 11's small square
    coco = coco_from_dataset(data)
    assert len(instances_from_coco(coco, 11, CATEGORY_MAP)["labels"]) == 1
    with_crowd = instances_from_coco(coco, 11, CATEGORY_MAP, include_crowd=True)
    assert with_crowd["labels"].tolist() == [0, 1]
    assert with_crowd["boxes"][0].tolist() == [10.0, 10.0, 30.0, 30.0]
    assert with_crowd["masks"].shape == (2, 120, 160) and with_crowd["masks"][0].sum() == 400
    assert instances_from_coco(coco, 40, CATEGORY_MAP)["masks"].shape == (0, 64, 64)

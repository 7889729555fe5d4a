from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from pycocotools.coco import COCO

from tensormask_ray.errors import UserError
from tensormask_ray.evaluation.coco import predictions_to_coco
from tensormask_ray.evaluation.ground_truth import coco_gt_from_json
from tensormask_ray.evaluation.testdev import write_test_dev_results

from .synthetic import CATEGORY_IDS, gt_predictions

ALL_IMAGES = [11, 25, 30, 40]


@pytest.fixture
def image_info(tmp_path, dataset):
    """An image-info file like image_info_test-dev2017.json: images and categories only."""
    path = tmp_path / "image_info_test-dev2017.json"
    path.write_text(json.dumps({k: dataset[0][k] for k in ("images", "categories")}))
    return path


@pytest.fixture
def results(dataset):
    out = []
    for image_id, prediction in gt_predictions(dataset[1], erode=1).items():
        out += predictions_to_coco(prediction, image_id, CATEGORY_IDS)
    return out


def test_written_zipped_and_loadable(tmp_path, image_info, results):
    out = tmp_path / "out"
    json_path, zip_path = write_test_dev_results(
        iter(results * 50),  # a generator of 300 results: pycocotools sees 255 at a time
        image_info,
        out,
        "tensormask-r50",
        processed_image_ids=ALL_IMAGES,
    )
    assert json_path.name == "detections_test-dev2017_tensormask-r50_results.json"
    assert zip_path == out / "detections_test-dev2017_tensormask-r50_results.zip"
    assert sorted(p.name for p in out.iterdir()) == sorted([json_path.name, zip_path.name])
    with zipfile.ZipFile(zip_path) as z:
        assert z.namelist() == [json_path.name]
        assert json.loads(z.read(json_path.name)) == results * 50
    coco = coco_gt_from_json(image_info)
    loaded = coco.loadRes(str(json_path))  # the path the evaluation server's code takes
    assert len(loaded.getAnnIds()) == 300
    assert sorted(loaded.getImgIds()) == ALL_IMAGES


def test_accepts_a_coco_object_no_results_and_numpy_values(tmp_path, image_info, results):
    json_path, _ = write_test_dev_results([], COCO(str(image_info)), tmp_path, "x", ALL_IMAGES)
    assert json.loads(json_path.read_text()) == []
    result = {**results[0], "score": np.float32(0.5), "bbox": np.array([1.0, 2.0, 3.0, 4.0])}
    json_path, _ = write_test_dev_results([result], image_info, tmp_path, "x", ALL_IMAGES)
    assert json.loads(json_path.read_text())[0]["bbox"] == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    "change, processed, message",
    [
        (None, [11, 25, 30], r"1 images of .* were not processed: 40"),
        (None, ALL_IMAGES + [77, 78], r"2 processed image ids are not in .*: 77, 78"),
        ({"image_id": 77}, ALL_IMAGES, r"image ids not in the image-info file \(1\): 77"),
        ({"category_id": 99}, ALL_IMAGES, r"unknown category ids \(1\): 99"),
        ({"score": float("nan")}, ALL_IMAGES, r"non-finite score \(1\): 11"),
        ({"bbox": [0, 0, -1, 2]}, ALL_IMAGES, r"bbox .* \(1\): 11"),
        (
            {"segmentation": {"size": [5, 5], "counts": "00"}},
            ALL_IMAGES,
            r"RLE of the image's size \(1\): 11",
        ),
        # a full 240 x 320 mask labelled 120 x 160: more ones than the image has pixels
        (
            {"segmentation": {"size": [120, 160], "counts": "0PP[2"}},
            ALL_IMAGES,
            r"RLE that does not fit the image \(1\): 11",
        ),
    ],
)
def test_bad_results_raise_naming_the_ids(
    tmp_path, image_info, results, change, processed, message
):
    if change:
        results[0] = {**results[0], **change}  # results[0] is on image 11
    with pytest.raises(UserError, match=message):
        write_test_dev_results(results, image_info, tmp_path / "out", "x", processed)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_many_offenders_are_counted(tmp_path, image_info, results):
    bad = [{**r, "category_id": 1000 + i} for i, r in enumerate(results)]
    assert len(bad) == 6
    with pytest.raises(
        UserError, match=r"unknown category ids \(6\): 1000, 1001, 1002, 1003, 1004 and 1 more$"
    ):
        write_test_dev_results(bad, image_info, tmp_path, "x", ALL_IMAGES)


def test_bad_name(tmp_path, image_info):
    with pytest.raises(UserError, match="letters, digits"):
        write_test_dev_results([], image_info, tmp_path / "out", "my_model", ALL_IMAGES)
    assert not (tmp_path / "out").exists()

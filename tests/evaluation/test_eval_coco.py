from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from tensormask_ray.errors import UserError
from tensormask_ray.evaluation.coco import (
    METRIC_NAMES,
    NO_GROUND_TRUTH,
    evaluate_coco,
    format_metrics_table,
    predictions_to_coco,
)

from .synthetic import CATEGORY_IDS, gt_predictions

KEYS = [f"{t}/{n}" for t in ("segm", "bbox") for n in METRIC_NAMES]


def to_results(predictions, image_ids=None):
    results = []
    for image_id, prediction in predictions.items():
        if image_ids is None or image_id in image_ids:
            results += predictions_to_coco(prediction, image_id, CATEGORY_IDS)
    return results


def test_predictions_to_coco_fields_and_round_trip():
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4:6, 0:8] = True
    prediction = {
        "boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 4.0, 8.0, 6.0]]),
        "scores": torch.tensor([0.9, 0.25]),
        "labels": torch.tensor([2, 0]),
        "masks": masks,
    }
    results = predictions_to_coco(prediction, 7, CATEGORY_IDS)
    json.dumps(results)  # plain Python throughout
    assert [r["category_id"] for r in results] == [42, 3]
    assert results[0]["bbox"] == [2.0, 1.0, 3.0, 2.0]
    assert results[1]["score"] == pytest.approx(0.25)
    assert all(r["image_id"] == 7 and r["segmentation"]["size"] == [6, 8] for r in results)
    for r, m in zip(results, masks):
        assert isinstance(r["segmentation"]["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]), m.numpy())
    # numpy input gives the same
    as_numpy = {k: v.numpy() for k, v in prediction.items()}
    assert predictions_to_coco(as_numpy, 7, CATEGORY_IDS) == results


def test_predictions_to_coco_empty_and_bad_labels():
    empty = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 5, 5, dtype=torch.bool),
    }
    assert predictions_to_coco(empty, 1, CATEGORY_IDS) == []
    bad = {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([3])}
    with pytest.raises(ValueError, match="labels outside"):
        predictions_to_coco(bad, 1, CATEGORY_IDS)


def test_ground_truth_as_detections_scores_one(coco_gt, dataset, capsys):
    results = to_results(gt_predictions(dataset[1]))
    before = copy.deepcopy(results)
    metrics = evaluate_coco(coco_gt, results)
    assert sorted(metrics) == sorted(KEYS)
    assert all(metrics[k] == pytest.approx(1.0) for k in KEYS), metrics
    assert results == before  # the caller's results are not modified
    assert capsys.readouterr().out == ""  # pycocotools kept quiet


def test_many_results_and_lower_scored_duplicates(coco_gt, dataset):
    # 300 results: pycocotools' area() breaks on 256 or more RLEs in one call
    results = to_results(gt_predictions(dataset[1]))
    duplicates = [{**r, "score": 0.5 - i / 1000} for i in range(50) for r in results]
    metrics = evaluate_coco(coco_gt, results + duplicates)
    assert len(results + duplicates) == 306
    assert all(metrics[k] == pytest.approx(1.0) for k in KEYS), metrics  # ranked after every hit


def test_eroded_masks_lower_ap(coco_gt, dataset):
    eroded = evaluate_coco(
        coco_gt, to_results(gt_predictions(dataset[1], erode=2, keep_boxes=False))
    )
    assert eroded["segm/AP"] < 1.0 and eroded["bbox/AP"] < 1.0
    assert eroded["segm/AP_S"] < 1.0  # a 20x20 square eroded to 16x16: IoU 0.64


def test_eroded_masks_with_kept_boxes_lower_only_mask_ap(coco_gt, dataset):
    metrics = evaluate_coco(
        coco_gt, to_results(gt_predictions(dataset[1], erode=2, keep_boxes=True))
    )
    assert metrics["segm/AP"] < 1.0
    assert all(metrics[f"bbox/{n}"] == pytest.approx(1.0) for n in METRIC_NAMES)


def test_empty_results_give_zeros(coco_gt):
    metrics = evaluate_coco(coco_gt, [])
    assert metrics == {k: 0.0 for k in KEYS}


def test_subset_evaluation_uses_the_given_image_ids(coco_gt, dataset):
    results = to_results(gt_predictions(dataset[1]), image_ids={11})
    subset = evaluate_coco(coco_gt, results, image_ids=[11])
    assert subset["segm/AP"] == pytest.approx(1.0) and subset["bbox/AP"] == pytest.approx(1.0)
    everything = evaluate_coco(coco_gt, results)  # the other images' objects count as missed
    assert everything["segm/AP"] < 1.0


def test_area_range_without_ground_truth_is_minus_one(coco_gt, dataset):
    results = to_results(gt_predictions(dataset[1]), image_ids={30})
    metrics = evaluate_coco(coco_gt, results, iou_types=("segm",), image_ids=[30, 40])
    assert set(metrics) == {f"segm/{n}" for n in METRIC_NAMES}
    assert metrics["segm/AP_M"] == pytest.approx(1.0)
    assert metrics["segm/AP_S"] == NO_GROUND_TRUTH and metrics["segm/AP_L"] == NO_GROUND_TRUTH
    table = format_metrics_table(metrics)
    lines = table.splitlines()
    assert lines[0].split() == list(METRIC_NAMES)
    assert lines[1].split() == ["segm", "100.0", "100.0", "100.0", "-", "100.0", "-"]


def test_results_outside_the_ground_truth_raise(coco_gt, dataset):
    results = to_results(gt_predictions(dataset[1]))
    with pytest.raises(UserError, match="image ids .* 999"):
        evaluate_coco(coco_gt, results + [{**results[0], "image_id": 999}])
    with pytest.raises(UserError, match="category ids .* 5"):
        evaluate_coco(coco_gt, results + [{**results[0], "category_id": 5}])
    with pytest.raises(UserError, match="not among the images evaluated: 25"):
        evaluate_coco(coco_gt, to_results(gt_predictions(dataset[1]), {25}), image_ids=[11])

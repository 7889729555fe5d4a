from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tensormask_ray.evaluation.ground_truth import instances_from_coco
from tensormask_ray.evaluation.visualize import draw_instances, instance_colors, save_overlay

from .synthetic import CATEGORY_MAP, CLASS_NAMES

H, W = 120, 160


def scene():
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    masks = torch.zeros(3, H, W, dtype=torch.bool)
    masks[0, 70:110, 10:50] = True
    masks[1, 70:110, 100:140] = True
    masks[2, 5:25, 60:100] = True  # below the score threshold: not drawn
    prediction = {
        "boxes": torch.tensor([[10.0, 70, 50, 110], [100, 70, 140, 110], [60, 5, 100, 25]]),
        "scores": torch.tensor([0.9, 0.8, 0.1]),
        "labels": torch.tensor([0, 2, 1]),
        "masks": masks,
    }
    return image, prediction


def test_masks_drawn_in_two_colours_and_nothing_elsewhere():
    image, prediction = scene()
    drawn = draw_instances(image, prediction, CLASS_NAMES, score_thresh=0.5, alpha=0.5)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert not np.shares_memory(drawn, image)
    inside = [(slice(80, 100), slice(20, 40)), (slice(80, 100), slice(110, 130))]  # away from edges
    changes = []
    for rows, cols in inside:
        assert (drawn[rows, cols] != image[rows, cols]).any(axis=-1).all()
        # alpha blending: drawn - image / 2 is the colour / 2, the same at every pixel
        colour = 2 * drawn[rows, cols].astype(float) - image[rows, cols]
        assert np.abs(colour - colour.mean(axis=(0, 1))).max() <= 2
        changes.append(colour.mean(axis=(0, 1)))
    assert np.abs(changes[0] - changes[1]).max() > 50  # two different colours
    np.testing.assert_allclose(changes[0], instance_colors(2)[0], atol=2)
    # far from every drawn mask and label: untouched (the low-score instance included)
    np.testing.assert_array_equal(drawn[:40], image[:40])
    np.testing.assert_array_equal(drawn[:, 60:90], image[:, 60:90])
    # labels drawn just above the boxes
    assert (drawn[55:70, 10:40] != image[55:70, 10:40]).any()


def test_colours_are_deterministic_and_distinct():
    colours = instance_colors(12)
    assert colours.shape == (12, 3) and colours.dtype == np.uint8
    np.testing.assert_array_equal(colours, instance_colors(12))
    distances = np.abs(colours[:, None].astype(int) - colours[None].astype(int)).sum(-1)
    assert distances[~np.eye(12, dtype=bool)].min() > 30


def test_save_overlay_with_ground_truth(tmp_path, coco_gt):
    image, prediction = scene()
    path = save_overlay(tmp_path / "figs" / "a.png", image, prediction, CLASS_NAMES)
    written = np.asarray(Image.open(path))
    np.testing.assert_array_equal(written, draw_instances(image, prediction, CLASS_NAMES))

    gt = instances_from_coco(coco_gt, 11, CATEGORY_MAP)  # no scores: every instance, name only
    gt_image = np.full((H, W, 3), 200, dtype=np.uint8)
    pair = save_overlay(tmp_path / "pair.png", gt_image, gt, CLASS_NAMES, ground_truth=gt)
    both = np.asarray(Image.open(pair))
    assert both.shape == (H, 2 * W + 8, 3)
    np.testing.assert_array_equal(both[:, :W], both[:, W + 8 :])
    assert (both[15:25, 15:25] != 200).any(axis=-1).all()  # the small square of image 11

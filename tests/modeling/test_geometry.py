"""The two window geometries: the paper's is what it was; Detectron2's windows are its anchors."""

import pytest
import torch

from tensormask_ray.modeling.windows import build_window_groups, window_boxes
from tests.detectron2_reference import ANCHOR_SIZES, grid_anchors_with_indexes


def test_detectron2_windows_are_its_anchors_in_its_order():
    groups = build_window_groups("bipyramid", [11, 15], 2, 7, 1.0, "bilinear", "detectron2")
    grids = [(7, 9), (4, 5), (2, 3), (1, 2), (1, 1), (1, 1)]
    anchors, indexes = grid_anchors_with_indexes(grids, [4, 8, 16, 32, 64, 128], ANCHOR_SIZES)
    lvl, _, h, w, a = indexes.unbind(1)
    ours = window_boxes(groups, lvl * 2 + a, h, w)
    assert torch.equal(ours, anchors)  # to the bit: centre stride * x, side S, symmetric
    for g in groups:
        assert g.op.geometry == "detectron2" and g.op.stride == 2**g.k and g.center_offset == 0.0
        assert g.extent() == (g.side / 2, g.side / 2)


def test_paper_geometry_is_unchanged():
    for g in build_window_groups("bipyramid", [15, 10], 2, 4, 1.0, "bilinear", "paper"):
        assert g.op.geometry == "paper" and g.center_offset == 2.0  # half the finest stride
        half = g.mask_size // 2
        assert g.extent() == ((half + 0.5) * 4, (g.mask_size - half - 0.5) * 4)
    aligned = build_window_groups("simple_aligned", [9], 3, 4, 1.0, "bilinear", "detectron2")
    assert all(g.op.geometry == "detectron2" and g.op.stride == 1 for g in aligned)  # SwapAlign2Nat(1)
    natural = build_window_groups("simple_natural", [9], 3, 4, 1.0, "bilinear", "detectron2")
    assert all(g.op.alpha == 0 and g.center_offset == 0.0 for g in natural)
    with pytest.raises(ValueError, match="no Detectron2 counterpart"):
        build_window_groups("upscale_aligned", [15], 3, 4, 1.5, "bilinear", "detectron2")

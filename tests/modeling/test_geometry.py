"""The two window geometries: the paper's is what it was; Detectron2's windows are its anchors."""

import pytest
import torch

from tensormask_ray.modeling.mask_heads import MASK_HEADS, build_mask_head
from tensormask_ray.modeling.window_op import WindowOp
from tensormask_ray.modeling.windows import build_window_groups, window_boxes
from tests.detectron2_reference import ANCHOR_SIZES, grid_anchors_with_indexes


def test_detectron2_windows_are_its_anchors_in_its_order():
    groups = build_window_groups(
        build_mask_head("bipyramid", 1.0, "bilinear", "detectron2"), [11, 15], 2, 7
    )
    grids = [(7, 9), (4, 5), (2, 3), (1, 2), (1, 1), (1, 1)]
    anchors, indexes = grid_anchors_with_indexes(grids, [4, 8, 16, 32, 64, 128], ANCHOR_SIZES)
    lvl, _, h, w, a = indexes.unbind(1)
    ours = window_boxes(groups, lvl * 2 + a, h, w)
    assert torch.equal(ours, anchors)  # to the bit: centre stride * x, side S, symmetric
    for g in groups:
        assert g.op.geometry == "detectron2" and g.op.stride == 2**g.k and g.center_offset == 0.0
        assert g.extent() == (g.side / 2, g.side / 2)


def test_paper_geometry_is_unchanged():
    for g in build_window_groups(
        build_mask_head("bipyramid", 1.0, "bilinear", "paper"), [15, 10], 2, 4
    ):
        assert g.op.geometry == "paper" and g.center_offset == 2.0  # half the finest stride
        half = g.mask_size // 2
        assert g.extent() == ((half + 0.5) * 4, (g.mask_size - half - 0.5) * 4)
    aligned = build_window_groups(
        build_mask_head("simple_aligned", 1.0, "bilinear", "detectron2"), [9], 3, 4
    )
    assert all(
        g.op.geometry == "detectron2" and g.op.stride == 1 for g in aligned
    )  # SwapAlign2Nat(1)
    natural = build_window_groups(
        build_mask_head("simple_natural", 1.0, "bilinear", "detectron2"), [9], 3, 4
    )
    assert all(g.op.natural and g.center_offset == 0.0 for g in natural)
    with pytest.raises(ValueError, match="no Detectron2 counterpart"):
        build_window_groups(
            build_mask_head("upscale_aligned", 1.5, "bilinear", "detectron2"), [15], 3, 4
        )


def test_each_fig6_head_owns_its_coarse_size_cells_and_window_op():
    heads = {name: build_mask_head(name, 2.0, "bilinear", "paper") for name in MASK_HEADS}
    assert [heads[n].coarse_size(15) for n in MASK_HEADS] == [15, 15, 8, 8, 15]  # round(15 / 2)
    assert heads["simple_natural"].window_op(15, 2) == WindowOp((15, 15), natural=True)
    assert heads["simple_aligned"].window_op(15, 2) == WindowOp((15, 15), alpha=1)
    assert heads["upscale_natural"].window_op(15, 2) == WindowOp(
        (15, 15), natural=True, mode="bilinear"
    )
    assert heads["upscale_aligned"].window_op(15, 2) == WindowOp((15, 15), alpha=1, mode="bilinear")
    assert heads["bipyramid"].window_op(15, 2) == WindowOp(
        (60, 60), alpha=1, stride=4, mode="bilinear"
    )
    assert [heads[n].cell_size(5, 3) for n in MASK_HEADS] == [
        32,
        32,
        32,
        32,
        8,
    ]  # bipyramid: finest stride
    with pytest.raises(ValueError, match="unknown mask head 'fancy'"):
        build_mask_head("fancy", 2.0, "bilinear", "paper")
    with pytest.raises(ValueError, match="alpha must be >= 1"):
        WindowOp((5, 5), alpha=0)  # a natural tensor says so (natural=True), not with alpha 0

"""Training targets (targets.py) on a hand-built case, the box coder's round trip, and the FPN's
averaged top-down fusion (paper §4.2)."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from tensormask_ray.config import AssignConfig
from tensormask_ray.modeling.assignment import IGNORE
from tensormask_ray.modeling.fpn import FPN
from tensormask_ray.modeling.mask_heads import build_mask_head
from tensormask_ray.modeling.targets import build_targets
from tensormask_ray.modeling.windows import (
    UNIT_WEIGHTS,
    build_window_groups,
    decode_boxes,
    encode_boxes,
    window_boxes,
)

# As test_assignment.py: window 9 on strides 8 and 16 (72 and 144 px windows, 8 px mask cells),
# a 128 x 128 image.
GROUPS = build_window_groups(build_mask_head("simple_aligned", 1.0, "bilinear", "paper"), [9], 3, 4)
GRIDS = [(16, 16), (8, 8)]
K = 3  # classes; K is the negative class in the targets
D2_WEIGHTS = (1.5, 1.5, 0.75, 0.75)
RULES = {
    **asdict(AssignConfig()),
    "geometry": "paper",
}  # the paper's assignment, as the config's defaults


def image_target(boxes, labels, crowd=None):
    """{"boxes", "labels", "masks", "iscrowd"}: each mask fills its box exactly."""
    masks = torch.zeros((len(boxes), 128, 128), dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes):
        m[int(y0) : int(y1), int(x0) : int(x1)] = 1
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": masks,
        "iscrowd": torch.tensor(crowd or [False] * len(boxes)),
    }


@pytest.mark.parametrize("weights", [UNIT_WEIGHTS, D2_WEIGHTS])
def test_targets_of_one_object_one_crowd_region_and_an_empty_image(weights):
    obj = [24.0, 24.0, 64.0, 64.0]  # 40 px, centred at (44, 44): window (5, 5) and 4 neighbours
    crowd = [88.0, 88.0, 112.0, 112.0]
    targets = [image_target([obj, crowd], [2, 0], [False, True]), image_target([], [])]
    t = build_targets(GROUPS, GRIDS, targets, K, **RULES, box_weights=weights)

    fine = t.cls[0, : 16 * 16].view(16, 16)
    expected = {(5, 5), (4, 5), (6, 5), (5, 4), (5, 6)}
    assert {tuple(p) for p in (fine == 2).nonzero().tolist()} == expected
    assert t.num_fg == 5 and t.fg.sum() == 5 and (t.cls[t.fg] == 2).all()
    assert (t.cls[0] == IGNORE).any() and set(t.cls[0].unique().tolist()) == {
        IGNORE,
        2,
        K,
    }  # crowd: ignored
    assert (t.cls[1] == K).all() and not t.fg[1].any()  # no objects: every window negative

    # box targets: in fg.nonzero() order, and they decode back to the object's box
    image, window = t.fg.nonzero(as_tuple=True)
    assert (image == 0).all()
    group = torch.zeros_like(window)
    ys, xs = window // 16, window % 16
    wins = window_boxes(GROUPS, group, ys, xs)
    assert torch.allclose(
        decode_boxes(wins, t.box_deltas, weights), torch.tensor([obj] * 5), atol=1e-4
    )

    # mask targets: the object's cells in each positive window's 9 x 9 grid of 8 px cells
    pos = t.positives[0]
    assert t.positives[1].masks.shape == (0, 9, 9)
    assert {(int(y), int(x)) for y, x in zip(pos.ys, pos.xs)} == expected and (pos.image == 0).all()
    for y, x, m in zip(pos.ys.tolist(), pos.xs.tolist(), pos.masks):
        top, left = y * 8 + 4 - 36, x * 8 + 4 - 36  # the window's corner in the image
        rows = [r for r in range(9) if top + 8 * r >= 24 and top + 8 * (r + 1) <= 64]
        cols = [c for c in range(9) if left + 8 * c >= 24 and left + 8 * (c + 1) <= 64]
        want = torch.zeros(9, 9)
        want[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = 1
        assert torch.equal(m, want), (y, x)


@pytest.mark.parametrize("weights", [UNIT_WEIGHTS, D2_WEIGHTS])
def test_box_coder_round_trip(weights):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(64, 2, generator=g) * 200
    windows = torch.cat([xy, xy + 8 + torch.rand(64, 2, generator=g) * 100], dim=1)
    boxes = torch.cat(
        [xy + torch.randn(64, 2, generator=g) * 5, xy + 4 + torch.rand(64, 2, generator=g) * 150],
        dim=1,
    )
    deltas = encode_boxes(windows, boxes, weights)
    assert torch.allclose(decode_boxes(windows, deltas, weights), boxes, atol=1e-3)
    assert torch.allclose(encode_boxes(windows, windows, weights), torch.zeros(64, 4), atol=1e-6)
    # the weights scale the deltas, as Detectron2's Box2BoxTransform(weights)
    plain = encode_boxes(windows, boxes, UNIT_WEIGHTS)
    assert torch.allclose(deltas, plain * torch.tensor(weights), atol=1e-5)


def test_fpn_averages_top_down_and_lateral():
    """P_l before its 3x3 output conv is (lateral_l + upsample(P_{l+1})) / 2 with 'avg' (the
    paper's choice) and their sum with 'sum'; P6/P7 come from C5 as in RetinaNet."""
    torch.manual_seed(0)
    channels = {"C2": 3, "C3": 4, "C4": 5, "C5": 6}
    feats = {
        f"C{lv}": torch.randn(1, c, 2 ** (6 - lv), 2 ** (6 - lv))
        for lv, c in zip(range(2, 6), channels.values())
    }
    outs = {}
    for fuse in ("avg", "sum"):
        fpn = FPN(channels, 8, 2, 7, fuse)
        if outs:  # same weights for both
            fpn.load_state_dict(outs["avg"][0].state_dict())
        merged = []
        for conv in fpn.output:  # record each output conv's input: the merged map
            conv.register_forward_hook(lambda m, inp, out, merged=merged: merged.append(inp[0]))
        p = fpn(feats)
        outs[fuse] = (fpn, merged, p)
    fpn, merged, p = outs["avg"]
    lat = [conv(feats[f"C{lv}"]) for conv, lv in zip(fpn.lateral, fpn.lateral_levels)]
    up = torch.nn.functional.interpolate
    m5 = lat[3]
    m4 = (lat[2] + up(m5, scale_factor=2, mode="nearest")) / 2
    m3 = (lat[1] + up(m4, scale_factor=2, mode="nearest")) / 2
    m2 = (lat[0] + up(m3, scale_factor=2, mode="nearest")) / 2
    for got, want in zip(merged, [m2, m3, m4, m5]):
        assert torch.allclose(got, want, atol=1e-6)
    s5 = lat[3]
    s4 = lat[2] + up(s5, scale_factor=2, mode="nearest")
    assert torch.allclose(outs["sum"][1][2], s4, atol=1e-6)
    assert [tuple(x.shape[-2:]) for x in p] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    assert fpn.strides == [4, 8, 16, 32, 64, 128]
    with pytest.raises(ValueError, match="fuse must be 'avg' or 'sum', got 'max'"):
        FPN(channels, 8, 2, 7, "max")

"""Hand-built cases for the mask-driven assignment (paper §4.2): each condition on and off,
a uniqueness conflict, the small-object fallback, crowd regions."""

from dataclasses import asdict

import torch

from tensormask_ray.config import AssignConfig
from tensormask_ray.modeling.assignment import IGNORE, NEGATIVE, assign_windows
from tensormask_ray.modeling.mask_heads import build_mask_head
from tensormask_ray.modeling.windows import build_window_groups

# Two feature-pyramid levels, window 9: stride 8 -> 72 px windows, stride 16 -> 144 px windows.
GROUPS = build_window_groups(build_mask_head("simple_aligned", 1.0, "bilinear", "paper"), [9], 3, 4)
GRIDS = [(16, 16), (8, 8)]
RULES = {
    **asdict(AssignConfig()),
    "geometry": "paper",
}  # the paper's rules, as the config's defaults


def positives(boxes, crowd=None, **kw):
    a = assign_windows(
        GROUPS, GRIDS, torch.tensor(boxes, dtype=torch.float32), crowd, **{**RULES, **kw}
    )
    out = []
    for gi, (h, w) in enumerate(GRIDS):
        lab = a.labels[a.offsets[gi] : a.offsets[gi + 1]].view(h, w)
        out.append({(int(y), int(x)): int(lab[y, x]) for y, x in (lab >= 0).nonzero().tolist()})
    return out, a


def box(cx, cy, w, h=None):
    h = w if h is None else h
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def test_all_conditions_met_gives_centre_and_its_four_neighbours():
    # window (5, 5) of the stride-8 grid is centred at 5*8 + 4 = 44; neighbours are 8 px = 1 unit away
    pos, _ = positives([box(44, 44, 40)])
    assert pos[0] == {
        (5, 5): 0,
        (4, 5): 0,
        (6, 5): 0,
        (5, 4): 0,
        (5, 6): 0,
    }  # diagonals: 11.3 px > 1 unit
    assert pos[1] == {}  # 40 < 144 / 2: too small for the coarse level


def test_centrality_radius_controls_the_neighbourhood():
    pos, _ = positives([box(44, 44, 40)], center_radius=0.5)
    assert pos[0] == {(5, 5): 0}
    pos, _ = positives([box(44, 44, 40)], center_radius=1.5)
    assert len(pos[0]) == 9  # the 3 x 3 block, diagonals at 1.41 units


def test_containment_excludes_windows_that_cut_the_mask():
    # 70 px mask in 72 px windows: only the centred window contains it
    pos, _ = positives([box(44, 44, 70)])
    assert pos[0] == {(5, 5): 0}
    # 80 px: no 72 px window contains it; the 144 px windows of the next level do
    pos, _ = positives([box(44, 44, 80)])
    assert pos[0] == {}
    assert len(pos[1]) >= 1


def test_scale_condition_and_small_object_fallback():
    # 30 px < 72/2: fails the size test, but is below the smallest assignable size (36 px),
    # so the fallback gives it to the smallest windows
    pos, _ = positives([box(44, 44, 30)])
    assert pos[0] == {(5, 5): 0, (4, 5): 0, (6, 5): 0, (5, 4): 0, (5, 6): 0}
    pos, _ = positives([box(44, 44, 30)], small_object_fallback=False)
    assert pos == [{}, {}]
    # 100 px is too big for 72 px windows and >= 144/2: assigned on the coarse level only
    pos, _ = positives([box(88, 88, 100)])
    assert pos[0] == {} and (5, 5) in pos[1]  # (5,5) at stride 16 is centred at 88


def test_uniqueness_conflict_makes_windows_negative():
    boxes = [box(44, 44, 40), box(44, 44, 50)]
    pos, a = positives(boxes)
    assert pos == [{}, {}]
    assert (a.labels == NEGATIVE).all()
    pos, _ = positives(boxes, uniqueness=False)
    assert set(pos[0].values()) == {0}  # the smaller mask wins when uniqueness is off


def test_two_separate_masks_each_get_their_windows():
    pos, _ = positives([box(44, 44, 40), box(108, 108, 40)])  # window (13, 13) centred at 108
    assert pos[0][(5, 5)] == 0 and pos[0][(13, 13)] == 1 and len(pos[0]) == 10


def test_crowd_regions_are_ignored_not_negative():
    pos, a = positives([box(44, 44, 40)], crowd=torch.tensor([True]))
    assert pos == [{}, {}]
    first = a.labels[: 16 * 16].view(16, 16)
    assert first[5, 5] == IGNORE and first[4, 5] == IGNORE and first[0, 0] == NEGATIVE


def test_no_ground_truth_means_all_negative():
    a = assign_windows(GROUPS, GRIDS, torch.zeros((0, 4)), **RULES)
    assert a.labels.shape == (16 * 16 + 8 * 8,) and (a.labels == NEGATIVE).all()

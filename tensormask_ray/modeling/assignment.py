"""Mask-driven label assignment (paper §4.2), vectorised.

A window is positive for ground-truth mask m when
  (i)   containment: the window fully contains m's box, and m's longer side (image pixels) is at
        least `scale_ratio` (1/2) of the window's side;
  (ii)  centrality: the centre of m's box is within `center_radius` units of the window centre
        (l2 distance), the unit being the spacing of the window grid (the level's stride);
  (iii) uniqueness: no other mask m' satisfies (i) and (ii) for that window.
Fallback (footnote 3): a mask smaller than the smallest assignable size (scale_ratio x the
smallest window side) meets the size part of (i) for windows of the smallest size.
Everything else is negative. Windows that a crowd region satisfies (i)-(ii) for, and that are not
positive, are ignored rather than negative.

One convention for every window label in training (here and in targets.py): IGNORE (-1) is a
window left out of the classification loss; a negative window is "no object": NEGATIVE (-2) as a
matched ground-truth index here, the background class K (= num_classes) as a class target, as in
Detectron2 and torchvision's detectors.

The unit of (ii): for the feature-pyramid heads sigma_VU = sigma_HW = the stride, as in the paper.
For the tensor bipyramid the paper's sigma_VU is the finest stride at every level, which would leave
coarse levels (spacing 2^k times larger) with almost no window in reach of a mask centre; like
Detectron2's reference implementation we measure centrality in units of the window grid's spacing.

Detectron2's rules (geometry "detectron2", its `_assignment_rule` and DatasetMapper), where they
differ: the size part of (i) is relaxed by one stride, since windows sit only every stride pixels:
2 m_long >= S - stride (S the window side; 2 = 1 / scale_ratio), with the fallback
max(2 m_long, S_min - stride_min) where S_min - stride_min is the smallest such bound over the
groups; (ii) is computed as their ((c_gt - c_win) / stride)^2 summed; crowd regions and boxes with
an empty side take no part at all (their mapper drops them, so crowd windows are negatives, not
ignored); without uniqueness, a window several masks satisfy is ignored.

Cost: only windows within `center_radius` of a mask centre can be positive, so candidates are the
(2r+1)^2 grid positions around each centre, per group: O(G * groups * (2r+1)^2), no loop over
windows and no (G x all windows) matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .windows import WindowGroup

IGNORE = (
    -1
)  # left out of the classification loss (here: as a matched index; targets.py: as a class)
NEGATIVE = -2  # matched to no ground truth (a class target says K, the background class, instead)


@dataclass
class Assignment:
    """Per window of one image, in the flattened order of `groups` (level-major, row-major grid)."""

    labels: torch.Tensor  # (M,) int64: matched gt index >= 0, NEGATIVE or IGNORE
    offsets: list[int]  # start of each group in the flat window list (len(groups) + 1)


def assign_windows(
    groups: list[WindowGroup],
    grids: list[tuple[int, int]],
    gt_boxes: torch.Tensor,
    gt_crowd: torch.Tensor | None = None,
    *,
    scale_ratio: float,
    center_radius: float,
    uniqueness: bool,
    small_object_fallback: bool,
    geometry: str,
) -> Assignment:
    """groups/grids: the window groups and their (Hg, Wg); gt_boxes (G, 4) xyxy image pixels;
    gt_crowd (G,) bool (None: no crowd regions). The rule's settings come from the config
    (config.AssignConfig, model.geometry), their one home. Returns each window's matched gt (>= 0),
    NEGATIVE or IGNORE."""
    d2 = geometry == "detectron2"
    device = gt_boxes.device
    sizes = [h * w for h, w in grids]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    M = offsets[-1]
    labels = torch.full((M,), NEGATIVE, dtype=torch.int64, device=device)
    G = gt_boxes.shape[0]
    if G == 0 or M == 0:
        return Assignment(labels, offsets)
    if gt_crowd is None:
        gt_crowd = torch.zeros(G, dtype=torch.bool, device=device)

    boxes = gt_boxes.float()
    gt_long = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])  # (G,)
    gt_ctr = (boxes[:, :2] + boxes[:, 2:]) / 2  # (G, 2) x, y
    min_side = min(g.side for g in groups)
    too_small = gt_long < scale_ratio * min_side  # fallback candidates
    if d2:
        # Detectron2 sees neither crowd regions nor boxes with an empty side (its mapper drops them).
        taking_part = (
            ~gt_crowd & (boxes[:, 2] - boxes[:, 0] > 1e-5) & (boxes[:, 3] - boxes[:, 1] > 1e-5)
        )
        gt_crowd = torch.zeros_like(gt_crowd)
        min_need = min(g.side - g.stride for g in groups)  # its min_anchor_size
        gt_upper = gt_long * (
            1.0 / scale_ratio
        )  # (G,) the largest window side (less a stride) allowed
        if small_object_fallback:
            gt_upper = torch.where(
                gt_upper < min_need, torch.full_like(gt_upper, min_need), gt_upper
            )

    R = int(math.ceil(center_radius))
    offs = torch.arange(-R, R + 1, device=device)
    dy, dx = torch.meshgrid(offs, offs, indexing="ij")
    dy, dx = dy.reshape(-1), dx.reshape(-1)  # (P,)

    cand_window, cand_gt = [], []
    for g, (h, w), start in zip(groups, grids, offsets):
        # continuous grid coordinates of each gt centre, and the positions around it
        gx = (gt_ctr[:, 0] - g.center_offset) / g.stride  # (G,)
        gy = (gt_ctr[:, 1] - g.center_offset) / g.stride
        px = torch.round(gx)[:, None].long() + dx[None, :]  # (G, P)
        py = torch.round(gy)[:, None].long() + dy[None, :]
        inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
        cx = px.float() * g.stride + g.center_offset  # window centres (G, P)
        cy = py.float() * g.stride + g.center_offset
        before, after = g.extent()
        contains = (
            (cx - before <= boxes[:, 0:1])
            & (cy - before <= boxes[:, 1:2])
            & (cx + after >= boxes[:, 2:3])
            & (cy + after >= boxes[:, 3:4])
        )
        if d2:
            ox, oy = (gt_ctr[:, :1] - cx) / g.stride, (gt_ctr[:, 1:] - cy) / g.stride
            central = ox * ox + oy * oy <= center_radius * center_radius
            big_enough = (gt_upper - (g.side - g.stride) >= 0) & taking_part  # (G,)
        else:
            central = ((cx - gt_ctr[:, :1]) ** 2 + (cy - gt_ctr[:, 1:]) ** 2) <= (
                center_radius * g.stride
            ) ** 2
            big_enough = gt_long >= scale_ratio * g.side  # (G,)
            if small_object_fallback and g.side == min_side:
                big_enough = big_enough | too_small
        ok = inside & central & contains & big_enough[:, None]  # (G, P)
        gi, pi = ok.nonzero(as_tuple=True)
        cand_window.append(start + py[gi, pi] * w + px[gi, pi])
        cand_gt.append(gi)
    win = torch.cat(cand_window)
    gt = torch.cat(cand_gt)

    crowd = gt_crowd[gt]
    real_win, real_gt = win[~crowd], gt[~crowd]
    count = torch.zeros(M, dtype=torch.int64, device=device).index_add_(
        0, real_win, torch.ones_like(real_win)
    )
    if uniqueness:
        labels[real_win[count[real_win] == 1]] = real_gt[count[real_win] == 1]
    elif d2:
        labels[real_win[count[real_win] == 1]] = real_gt[count[real_win] == 1]
        labels[real_win[count[real_win] > 1]] = IGNORE
    else:
        # Several masks qualify: take the one with the smallest box (a deterministic choice).
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        by_area = torch.argsort(area[real_gt], stable=True)
        by_window = by_area[torch.argsort(real_win[by_area], stable=True)]
        win_sorted, gt_sorted = real_win[by_window], real_gt[by_window]
        first = torch.ones_like(win_sorted, dtype=torch.bool)
        first[1:] = win_sorted[1:] != win_sorted[:-1]
        labels[win_sorted[first]] = gt_sorted[first]
    crowd_win = win[crowd]
    crowd_win = crowd_win[labels[crowd_win] < 0]
    labels[crowd_win] = IGNORE
    return Assignment(labels, offsets)

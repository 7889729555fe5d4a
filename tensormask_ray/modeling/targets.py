"""Training targets for every window of a batch: class, box deltas and, for the positive windows,
the ground-truth mask resampled onto the window's (Vo, Uo) grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import roi_align

from .assignment import IGNORE, assign_windows
from .windows import WindowGroup, encode_boxes


@dataclass
class GroupPositives:
    """The positive windows of one window group, over the whole batch."""

    image: torch.Tensor  # (P,) int64 image index in the batch
    ys: torch.Tensor  # (P,) grid row
    xs: torch.Tensor  # (P,) grid column
    masks: torch.Tensor  # (P, Vo, Uo) float {0, 1}


@dataclass
class BatchTargets:
    cls: torch.Tensor  # (N, M) int64: class for positives, K (background) for negatives, IGNORE
    fg: torch.Tensor  # (N, M) bool: positive windows
    box_deltas: torch.Tensor  # (F, 4): targets of the positives, in (image, window) order
    positives: list[GroupPositives]  # per group
    num_fg: int


def mask_targets(
    gt_masks: torch.Tensor,
    gt_index: torch.Tensor,
    windows: torch.Tensor,
    mask_size: int,
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """Resamples gt_masks (G, h, w) {0,1} onto windows (P, 4) xyxy as (P, Vo, Vo) {0,1} targets:
    each cell takes the mean of sampling_ratio^2 samples of its image area (0: ceil(cell size)
    per axis, as Detectron2's BitMasks.crop_and_resize), thresholded at 0.5."""
    if windows.shape[0] == 0:
        return gt_masks.new_zeros((0, mask_size, mask_size), dtype=torch.float32)
    rois = torch.cat([gt_index[:, None].to(windows.dtype), windows], dim=1)
    soft = roi_align(
        gt_masks[:, None].float(), rois, (mask_size, mask_size), 1.0, sampling_ratio, aligned=True
    )
    return (soft[:, 0] >= 0.5).float()  # (P, Vo, Vo)


@torch.no_grad()
def build_targets(
    groups: list[WindowGroup],
    grids: list[tuple[int, int]],
    targets: list[dict],
    num_classes: int,
    *,
    scale_ratio: float,
    center_radius: float,
    uniqueness: bool,
    small_object_fallback: bool,
    geometry: str,
    box_weights: tuple[float, float, float, float],
) -> BatchTargets:
    """targets: per image {"boxes" (G, 4) xyxy, "labels" (G,), "masks" (G, h, w), "iscrowd" (G,)}.
    geometry "detectron2": its assignment rules (assignment.py) and its mask crops (BitMasks
    crop_and_resize: ROIAlign with adaptive sampling at the windows = its anchors)."""
    sampling_ratio = 0 if geometry == "detectron2" else 2
    cls_rows, fg_rows, deltas = [], [], []
    pos_parts: list[list[tuple]] = [[] for _ in groups]
    for i, t in enumerate(targets):
        boxes = t["boxes"].float()
        crowd = t.get("iscrowd")
        crowd = (
            crowd.bool()
            if crowd is not None
            else torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
        )
        a = assign_windows(
            groups, grids, boxes, crowd, scale_ratio=scale_ratio, center_radius=center_radius,
            uniqueness=uniqueness, small_object_fallback=small_object_fallback, geometry=geometry,
        )  # fmt: skip
        labels = t["labels"].long()
        cls_i = torch.full_like(a.labels, num_classes)
        pos = a.labels >= 0
        cls_i[pos] = labels[a.labels[pos]]
        cls_i[a.labels == IGNORE] = IGNORE
        cls_rows.append(cls_i)
        fg_rows.append(pos)
        win_boxes = []
        for gi, (g, (_h, w)) in enumerate(zip(groups, grids)):
            start, end = a.offsets[gi], a.offsets[gi + 1]
            local = pos[start:end].nonzero(as_tuple=True)[0]
            if local.numel() == 0:
                continue
            ys, xs = local // w, local % w
            centers = torch.stack([xs, ys], dim=1).float() * g.stride + g.center_offset
            boxes_g = g.boxes_at(centers)
            gt_idx = a.labels[start:end][local]
            win_boxes.append((start + local, boxes_g, gt_idx))
            m = mask_targets(t["masks"], gt_idx, boxes_g, g.mask_size, sampling_ratio)
            pos_parts[gi].append((torch.full_like(ys, i), ys, xs, m))
        if win_boxes:
            # deltas in flat window order, to line up with fg.nonzero()
            order = torch.argsort(torch.cat([wb[0] for wb in win_boxes]))
            wins = torch.cat([wb[1] for wb in win_boxes])[order]
            gts = torch.cat([wb[2] for wb in win_boxes])[order]
            deltas.append(encode_boxes(wins, boxes[gts], box_weights))
    cls = torch.stack(cls_rows)
    fg = torch.stack(fg_rows)
    device = cls.device
    positives = []
    for g, parts in zip(groups, pos_parts):
        if parts:
            positives.append(GroupPositives(*(torch.cat(p) for p in zip(*parts))))
        else:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            positives.append(
                GroupPositives(
                    empty, empty, empty, torch.zeros((0, g.mask_size, g.mask_size), device=device)
                )
            )
    box_deltas = torch.cat(deltas) if deltas else torch.zeros((0, 4), device=device)
    return BatchTargets(cls, fg, box_deltas, positives, int(fg.sum()))

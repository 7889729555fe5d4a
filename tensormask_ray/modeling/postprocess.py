"""Inference (paper §4.3): per-class scores, top-k candidates, class-aware NMS on the regressed
boxes, then masks for the surviving windows only, pasted at image resolution as Mask R-CNN does
(bilinear resampling of the window's soft mask onto the image pixels it covers, threshold 0.5).

Two candidate selections, one per geometry:
- `select_detections` (paper): candidates in window-group order (level, window size, row, column),
  top-k, boxes clipped to the image and empty ones dropped BEFORE NMS.
- `select_detections_detectron2`: Detectron2's TensorMask.inference_single_image step for step:
  candidates in its flat order (level, row, column, window size, class), a full descending sort cut
  at k (equal scores keep the order its sort gives them), NMS on the UNCLIPPED boxes; clipping and
  dropping empty boxes come after NMS and the top-100 cut (`clip_and_drop_empty`, its _postprocess),
  so an image can end with fewer than 100 detections where the paper path would have refilled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from .windows import UNIT_WEIGHTS, WindowGroup, decode_boxes, locate_windows, window_boxes


@dataclass
class Detections:
    """Surviving windows of one image, before mask decoding (coordinates of the network input)."""

    group: torch.Tensor  # (D,) group index
    ys: torch.Tensor  # (D,) grid row within the group
    xs: torch.Tensor  # (D,) grid column
    boxes: torch.Tensor  # (D, 4) regressed boxes, xyxy
    windows: torch.Tensor  # (D, 4) the windows' own boxes (what the mask covers)
    scores: torch.Tensor  # (D,)
    labels: torch.Tensor  # (D,) contiguous class index


def select_detections(
    groups: list[WindowGroup],
    grids: list[tuple[int, int]],
    cls_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    image_size: tuple[int, int],
    score_thresh: float,
    topk: int,
    nms_thresh: float,
    max_detections: int,
    box_weights: tuple[float, float, float, float] = UNIT_WEIGHTS,
) -> Detections:
    """cls_logits (M, K), box_deltas (M, 4) for the M windows of one image (flattened over groups)."""
    M, K = cls_logits.shape
    scores = cls_logits.float().sigmoid().flatten()  # (M*K,)
    keep = (scores > score_thresh).nonzero(as_tuple=True)[0]
    top = scores[keep].topk(min(topk, keep.numel())) if keep.numel() else (scores[:0], keep[:0])
    top_scores, top_idx = top[0], keep[top[1]]
    window, label = top_idx // K, top_idx % K
    group, ys, xs, windows = locate_windows(groups, grids, window)
    boxes = decode_boxes(windows, box_deltas[window], box_weights)
    boxes, nonempty = clip_and_drop_empty(boxes, *image_size)
    idx = nonempty.nonzero(as_tuple=True)[0]
    kept = idx[batched_nms(boxes[idx], top_scores[idx], label[idx], nms_thresh)][:max_detections]
    return Detections(
        group[kept], ys[kept], xs[kept], boxes[kept], windows[kept], top_scores[kept], label[kept]
    )


def select_detections_detectron2(
    groups: list[WindowGroup],
    cls: list[torch.Tensor],
    box: list[torch.Tensor],
    image: int,
    score_thresh: float,
    topk: int,
    nms_thresh: float,
    max_detections: int,
    box_weights: tuple[float, float, float, float] = UNIT_WEIGHTS,
) -> Detections:
    """Detectron2's candidate selection (module docstring). cls: per level (N, A*K, H_l, W_l),
    box: per level (N, A*4, H_l, W_l), the head's outputs; `groups` level-major, A per level. The
    boxes returned are not clipped (see clip_and_drop_empty)."""
    A = len(groups) // len(cls)
    K = cls[0].shape[1] // A
    device = cls[0].device
    # Its permute_to_N_HWA_K + cat: one flat vector in (level, row, column, window size, class) order.
    scores = torch.cat([c[image].permute(1, 2, 0).reshape(-1) for c in cls]).float().sigmoid()
    deltas = torch.cat([b[image].permute(1, 2, 0).reshape(-1, 4) for b in box])  # (sum H*W*A, 4)
    candidates = torch.where(scores > score_thresh)[0]
    num_topk = min(topk, candidates.numel())
    top_scores, order = scores[candidates].sort(descending=True)
    top_scores, top_idx = top_scores[:num_topk], candidates[order[:num_topk]]
    label, anchor = top_idx % K, top_idx // K  # anchor: (level, row, column, window size) flat
    sizes = torch.tensor([c.shape[-2] * c.shape[-1] * A for c in cls], device=device)
    level = torch.bucketize(anchor, torch.cumsum(sizes, 0), right=True)
    local = anchor - (torch.cumsum(sizes, 0) - sizes)[level]
    widths = torch.tensor([c.shape[-1] for c in cls], device=device)[level]
    position, size_index = local // A, local % A
    ys, xs = position // widths, position % widths
    group = level * A + size_index
    windows = window_boxes(groups, group, ys, xs)  # its anchors
    boxes = decode_boxes(windows, deltas[anchor], box_weights)
    kept = batched_nms(boxes, top_scores, label, nms_thresh)[:max_detections]
    return Detections(
        group[kept], ys[kept], xs[kept], boxes[kept], windows[kept], top_scores[kept], label[kept]
    )


def clip_and_drop_empty(
    boxes: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detectron2's Boxes.clip + nonempty: boxes (D, 4) clipped to [0, width] x [0, height], and a
    (D,) bool of those with both sides > 0."""
    boxes = torch.stack(
        [
            boxes[:, 0].clamp(0, width),
            boxes[:, 1].clamp(0, height),
            boxes[:, 2].clamp(0, width),
            boxes[:, 3].clamp(0, height),
        ],
        dim=1,
    )
    return boxes, (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)


def paste_mask(
    prob: torch.Tensor, window: torch.Tensor, out_h: int, out_w: int, threshold: float = 0.5
) -> torch.Tensor:
    """prob (Vo, Uo) soft mask covering window (4,) xyxy (output-image pixels) -> (out_h, out_w) bool.

    Like Mask R-CNN's paste: every image pixel whose centre falls inside the window samples the
    soft mask bilinearly (grid_sample, align_corners=False, zeros outside), then >= threshold.
    Only the window's footprint on the image is computed."""
    out = torch.zeros((out_h, out_w), dtype=torch.bool, device=prob.device)
    x0, y0, x1, y1 = window.tolist()
    if x1 <= x0 or y1 <= y0:
        return out
    c0, r0 = max(int(x0), 0), max(int(y0), 0)
    c1, r1 = min(int(x1) + 1, out_w), min(int(y1) + 1, out_h)
    if c1 <= c0 or r1 <= r0:
        return out
    dev = prob.device
    gx = (torch.arange(c0, c1, device=dev, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
    gy = (torch.arange(r0, r1, device=dev, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]  # (1, rows, cols, 2)
    sampled = F.grid_sample(prob[None, None].float(), grid, mode="bilinear", align_corners=False)
    out[r0:r1, c0:c1] = sampled[0, 0] >= threshold
    return out


def paste_masks(
    probs: list[torch.Tensor], windows: torch.Tensor, out_h: int, out_w: int, threshold: float = 0.5
) -> torch.Tensor:
    """probs: D soft masks (Vo_i, Uo_i); windows (D, 4) in output pixels -> (D, out_h, out_w) bool."""
    if not probs:
        return torch.zeros((0, out_h, out_w), dtype=torch.bool, device=windows.device)
    return torch.stack([paste_mask(p, w, out_h, out_w, threshold) for p, w in zip(probs, windows)])

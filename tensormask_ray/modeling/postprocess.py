"""Inference (paper §4.3): per-class scores, top-k candidates, class-aware NMS on the regressed
boxes, then masks for the surviving windows only, pasted at image resolution as Mask R-CNN does
(bilinear resampling of the window's soft mask onto the image pixels it covers, threshold 0.5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from .windows import WindowGroup, decode_boxes, locate_windows


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
) -> Detections:
    """cls_logits (M, K), box_deltas (M, 4) for the M windows of one image (flattened over groups)."""
    M, K = cls_logits.shape
    scores = cls_logits.float().sigmoid().flatten()  # (M*K,)
    keep = (scores > score_thresh).nonzero(as_tuple=True)[0]
    top = scores[keep].topk(min(topk, keep.numel())) if keep.numel() else (scores[:0], keep[:0])
    top_scores, top_idx = top[0], keep[top[1]]
    window, label = top_idx // K, top_idx % K
    group, ys, xs, windows = locate_windows(groups, grids, window)
    boxes = decode_boxes(windows, box_deltas[window])
    h, w = image_size
    boxes = torch.stack(
        [boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1
    )
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    idx = nonempty.nonzero(as_tuple=True)[0]
    kept = idx[batched_nms(boxes[idx], top_scores[idx], label[idx], nms_thresh)][:max_detections]
    return Detections(group[kept], ys[kept], xs[kept], boxes[kept], windows[kept], top_scores[kept], label[kept])


def paste_mask(prob: torch.Tensor, window: torch.Tensor, out_h: int, out_w: int, threshold: float = 0.5) -> torch.Tensor:
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


def paste_masks(probs: list[torch.Tensor], windows: torch.Tensor, out_h: int, out_w: int, threshold: float = 0.5) -> torch.Tensor:
    """probs: D soft masks (Vo_i, Uo_i); windows (D, 4) in output pixels -> (D, out_h, out_w) bool."""
    if not probs:
        return torch.zeros((0, out_h, out_w), dtype=torch.bool, device=windows.device)
    return torch.stack([paste_mask(p, w, out_h, out_w, threshold) for p, w in zip(probs, windows)])

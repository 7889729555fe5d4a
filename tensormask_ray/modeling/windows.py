"""Sliding-window geometry: where each output window of each (level, window size) sits in the
image, the units of its mask, and the box coder relative to it.

A `WindowGroup` is one dense grid of windows: pyramid level l (k = l - min_level) and window size
V (= U). Its output masks are natural-representation tensors (N, Vo, Uo, Hg, Wg) whose cells are
`cell` image pixels, centred on the window centre (offset v - Vo//2, paper §3.2).

- Feature-pyramid heads (Fig. 7a): sigma_VU = sigma_HW = 2^l, so Vo = V and cell = 2^l.
- Tensor bipyramid (Fig. 7b): the unit sigma_VU stays that of the finest level at every level
  (cell = 2^min_level) while the mask grows to Vo = 2^k V; windows sit on the finest grid
  subsampled by 2^k (swap_align2nat), i.e. every 2^l pixels.
In both cases the window spans V * 2^l image pixels.

Coordinates are continuous image pixels (pixel i covers [i, i+1)). Two geometries:

- "paper": grid position y of a map with stride s has its centre at y*s + s/2 (the convention that
  bilinear resizing with align_corners=False preserves, which the bipyramid relies on); a window of
  Vo cells spans [c - (Vo//2 + 1/2) cell, c + (Vo - Vo//2 - 1/2) cell] around it, so that cell
  Vo//2 is centred on it.
- "detectron2": Detectron2's TensorMask. Window centres at y*s (TensorMaskAnchorGenerator shifts
  by 0, not by s/2), and the window is its anchor [c - S/2, c + S/2] with S = Vo*cell, symmetric
  for even Vo too; the aligned ops are its SwapAlign2Nat (window_op.WindowOp geometry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .window_op import WindowOp

if TYPE_CHECKING:
    from .mask_heads import MaskHead

BOX_CLAMP = math.log(1000.0 / 16)


@dataclass(frozen=True)
class WindowGroup:
    level: int  # FPN level l of P_l
    k: int  # l - min_level
    size_index: int  # a: which window size (anchor) of the level
    window_size: int  # V (= U), in units of the level's stride
    stride: int  # spacing of the window grid in image pixels (2^l)
    cell: int  # sigma_VU: image pixels per mask cell
    mask_size: int  # Vo (= Uo): mask cells per side
    center_offset: float  # image-pixel centre of grid position 0
    op: WindowOp  # head tensor -> natural masks
    geometry: str = "paper"  # "paper" | "detectron2" (module docstring)

    @property
    def side(self) -> float:
        """Window side in image pixels."""
        return float(self.mask_size * self.cell)

    def centers(self, grid: tuple[int, int], device=None) -> torch.Tensor:
        """(Hg*Wg, 2) window centres (x, y), row-major over the grid."""
        h, w = grid
        ys = torch.arange(h, device=device, dtype=torch.float32) * self.stride + self.center_offset
        xs = torch.arange(w, device=device, dtype=torch.float32) * self.stride + self.center_offset
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)

    def extent(self) -> tuple[float, float]:
        """(before, after): the window spans [c - before, c + after] on each axis (odd Vo, or the
        detectron2 geometry: symmetric)."""
        if self.geometry == "detectron2":
            return self.side / 2, self.side / 2
        half = self.mask_size // 2
        return (half + 0.5) * self.cell, (self.mask_size - half - 0.5) * self.cell

    def boxes_at(self, centers: torch.Tensor) -> torch.Tensor:
        """centers (M, 2) -> window boxes (M, 4) xyxy: exactly the area the Vo x Uo mask covers."""
        before, after = self.extent()
        return torch.cat([centers - before, centers + after], dim=1)

    def boxes(self, grid: tuple[int, int], device=None) -> torch.Tensor:
        return self.boxes_at(self.centers(grid, device))  # (Hg*Wg, 4)


GEOMETRIES = ("paper", "detectron2")


def build_window_groups(
    head: MaskHead, window_sizes: list[int], min_level: int, max_level: int
) -> list[WindowGroup]:
    """All (level, window size) groups of a mask head (mask_heads.py), level-major: the order of
    every flattened window list."""
    if head.geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {head.geometry!r}")
    d2 = head.geometry == "detectron2"
    groups = []
    for level in range(min_level, max_level + 1):
        k, stride = level - min_level, 2**level
        cell = head.cell_size(level, min_level)
        for a, V in enumerate(window_sizes):
            op = head.window_op(V, k)
            offset = 0.0 if d2 else 0.5 * cell
            groups.append(
                WindowGroup(level, k, a, V, stride, cell, op.out_size[0], offset, op, head.geometry)
            )
    return groups


def locate_windows(
    groups: list[WindowGroup], grids: list[tuple[int, int]], window: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """window (D,) indices into the flat window list of one image (group order, row-major grids)
    -> group (D,), grid row ys (D,), grid column xs (D,), and the windows' boxes (D, 4) xyxy."""
    device = window.device
    sizes = torch.tensor([h * w for h, w in grids], device=device)
    starts = torch.cumsum(sizes, 0) - sizes
    group = torch.bucketize(window, torch.cumsum(sizes, 0), right=True)
    local = window - starts[group]
    widths = torch.tensor([w for _, w in grids], device=device)[group]
    ys, xs = local // widths, local % widths
    return group, ys, xs, window_boxes(groups, group, ys, xs)


def window_boxes(
    groups: list[WindowGroup], group: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor
) -> torch.Tensor:
    """The boxes (D, 4) xyxy of the windows at grid positions (ys, xs) (D,) of groups `group` (D,):
    WindowGroup.boxes_at, vectorised over groups (in the detectron2 geometry: its anchors, to the bit)."""
    device = group.device
    stride = torch.tensor([g.stride for g in groups], device=device, dtype=torch.float32)[group]
    offset = torch.tensor([g.center_offset for g in groups], device=device, dtype=torch.float32)[
        group
    ]
    before = torch.tensor([g.extent()[0] for g in groups], device=device, dtype=torch.float32)[
        group
    ]
    after = torch.tensor([g.extent()[1] for g in groups], device=device, dtype=torch.float32)[group]
    cx, cy = xs.float() * stride + offset, ys.float() * stride + offset
    return torch.stack([cx - before, cy - before, cx + after, cy + after], dim=1)


# ----------------------------------------------------------------------------- box coder
# R-CNN's box coder relative to the window. `weights` (wx, wy, ww, wh) scale the deltas, as
# Detectron2's Box2BoxTransform(weights) does: TensorMask's (1.5, 1.5, 0.75, 0.75); the paper's
# plain coder is (1, 1, 1, 1), whose products and divisions are exact.
UNIT_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def encode_boxes(windows: torch.Tensor, boxes: torch.Tensor, weights=UNIT_WEIGHTS) -> torch.Tensor:
    """(M, 4) windows, (M, 4) target boxes, both xyxy -> (M, 4) deltas (dx, dy, dw, dh)."""
    ww, wh = windows[:, 2] - windows[:, 0], windows[:, 3] - windows[:, 1]
    wx, wy = windows[:, 0] + 0.5 * ww, windows[:, 1] + 0.5 * wh
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bx, by = boxes[:, 0] + 0.5 * bw, boxes[:, 1] + 0.5 * bh
    kx, ky, kw, kh = weights
    return torch.stack(
        [
            kx * (bx - wx) / ww,
            ky * (by - wy) / wh,
            kw * torch.log(bw / ww),
            kh * torch.log(bh / wh),
        ],
        dim=1,
    )


def decode_boxes(windows: torch.Tensor, deltas: torch.Tensor, weights=UNIT_WEIGHTS) -> torch.Tensor:
    """Inverse of encode_boxes: (M, 4) windows, (M, 4) deltas -> (M, 4) boxes xyxy."""
    deltas = deltas.float()
    ww, wh = windows[:, 2] - windows[:, 0], windows[:, 3] - windows[:, 1]
    wx, wy = windows[:, 0] + 0.5 * ww, windows[:, 1] + 0.5 * wh
    kx, ky, kw, kh = weights
    dx, dy = deltas[:, 0] / kx, deltas[:, 1] / ky
    dw, dh = (deltas[:, 2] / kw).clamp(max=BOX_CLAMP), (deltas[:, 3] / kh).clamp(max=BOX_CLAMP)
    cx, cy = dx * ww + wx, dy * wh + wy
    w, h = torch.exp(dw) * ww, torch.exp(dh) * wh
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)

"""The tensor bipyramid (paper §4.1, Fig. 7b, Fig. 8): its geometry (`Bipyramid`, the mask head of
Fig. 7b), its feature conversion (`BipyramidFusion`) and its lazy decode (`LazyBipyramidMasks`).

Geometry: the unit sigma_VU stays that of the finest level at every level (2^min_level pixels per
mask cell) while the mask grows to 2^k V cells at level k = l - min_level: level k's aligned
(V, U, H_0, W_0) tensor at the finest resolution becomes natural (2^k V, 2^k U, H_0/2^k, W_0/2^k)
windows by swap_align2nat with lam = 2^k.

Fusion (Fig. 8): each level's mask features (C, H/2^k, W/2^k) are bilinearly upsampled by 2^k to
the finest resolution (C, H, W); the finest level is added to every level (itself included); one
3x3 conv with ReLU (shared across levels) follows. The head's conv+reshape then gives, per level,
the aligned (V, U, H, W) tensor above.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .lazy import LazyMasks
from .window_op import WindowOp


@dataclass(frozen=True)
class Bipyramid:
    """The tensor bipyramid as a mask head (mask_heads.MaskHead)."""

    name: ClassVar[str] = "bipyramid"
    geometry: str  # "paper" | "detectron2" (Detectron2's SwapAlign2Nat at every level)

    def coarse_size(self, window_size: int) -> int:
        return window_size

    def window_op(self, window_size: int, k: int) -> WindowOp:
        lam = 2**k
        return WindowOp(
            (lam * window_size, lam * window_size),
            alpha=1,
            stride=lam,
            mode="bilinear",
            geometry=self.geometry,
        )

    def cell_size(self, level: int, min_level: int) -> int:
        return 2**min_level


class BipyramidFusion(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.fuse = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)
        )

    def upsample(self, feat: torch.Tensor, k: int, size: tuple[int, int]) -> torch.Tensor:
        """(N, C, h, w) at level k -> (N, C, H, W) at the finest resolution, geometry-preserving:
        scale 2^k (so grid centres stay put), then crop to the finest map's size."""
        if k == 0:
            return feat
        up = F.interpolate(
            feat,
            scale_factor=2.0**k,
            mode="bilinear",
            align_corners=False,
            recompute_scale_factor=False,
        )
        return up[:, :, : size[0], : size[1]]

    def fusion_input(self, feat: torch.Tensor, k: int, finest: torch.Tensor) -> torch.Tensor:
        """Level k's (N, C, h, w) upsampled to the finest level's (N, C, H, W), plus the finest."""
        return self.upsample(feat, k, finest.shape[-2:]) + finest

    def forward(self, mask_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """per level (N, C, H_k, W_k) -> per level (N, C, H_0, W_0)."""
        return [self.fuse(self.fusion_input(f, k, mask_feats[0])) for k, f in enumerate(mask_feats)]


class LazyBipyramidMasks(LazyMasks):
    """The bipyramid's mask output, computed only where decoded windows read it (lazy.py).

    Dense, every level's head tensor is (N, V*U, H_0, W_0) at the finest resolution: six levels of
    fusion conv and conv+reshape over the whole P2 grid, although inference decodes fewer than 100
    windows and the training loss reads only the positive ones. Here the mask-tower features are
    kept, and for each level the fusion (upsample + finest + 3x3 conv + ReLU) and the 1x1
    conv+reshape run on crops around the decoded windows. The masks equal the dense ones at those
    windows (tests/modeling/test_heads.py), and so do their gradients (tests/modeling/test_sparse_training.py).
    """

    halo = 1  # the fusion's 3x3 conv

    def __init__(
        self,
        fusion: BipyramidFusion,
        mask_preds: nn.ModuleList,
        coarse_sizes: list[int],
        mask_feats: list[torch.Tensor],
    ):
        super().__init__(mask_preds, coarse_sizes, mask_feats)
        self.fusion = fusion
        self._up: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.mask_feats[0].shape[-2:])  # (H_0, W_0)

    def bounds(self, k: int) -> tuple[int, int]:
        return self.size

    def features(
        self, k: int, image: int, rows: tuple[int, int], cols: tuple[int, int]
    ) -> torch.Tensor:
        return self.fused_crop(k, image, rows, cols)

    def dense_features(self, k: int) -> torch.Tensor:
        return self.fusion.fuse(self.fusion.fusion_input(self.mask_feats[k], k, self.mask_feats[0]))

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return itertools.chain(self.fusion.parameters(), self.mask_preds.parameters())

    def _fusion_input(self, k: int, image: int) -> torch.Tensor:
        """upsample(level k) + finest of one image, (1, C, H_0, W_0); cached per (level, image)."""
        key = (k, image)
        if key not in self._up:
            one = slice(image, image + 1)
            self._up[key] = self.fusion.fusion_input(
                self.mask_feats[k][one], k, self.mask_feats[0][one]
            )
        return self._up[key]

    def fused_crop(
        self, k: int, image: int, rows: tuple[int, int], cols: tuple[int, int]
    ) -> torch.Tensor:
        """The fusion's output (1, C, r1 - r0, c1 - c0) on rows [r0, r1) x cols [c0, c1) of the finest
        grid: the 3x3 conv reads a one-pixel halo, zeros outside the map (its padding)."""
        (r0, r1), (c0, c1) = rows, cols
        H, W = self.size
        x = self._fusion_input(k, image)
        a0, a1, b0, b1 = max(r0 - 1, 0), min(r1 + 1, H), max(c0 - 1, 0), min(c1 + 1, W)
        x = F.pad(
            x[:, :, a0:a1, b0:b1], (b0 - (c0 - 1), (c1 + 1) - b1, a0 - (r0 - 1), (r1 + 1) - a1)
        )
        conv = self.fusion.fuse[0]
        return F.relu(F.conv2d(x, conv.weight, conv.bias))

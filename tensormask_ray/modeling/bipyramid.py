"""The tensor bipyramid's feature conversion (paper §4.1, Fig. 8).

Each level's mask features (C, H/2^k, W/2^k) are bilinearly upsampled by 2^k to the finest
resolution (C, H, W); the finest level is added to every level (itself included); one 3x3 conv
with ReLU (shared across levels) follows. The head's conv+reshape then gives, per level, an aligned
(V, U, H, W) tensor, and swap_align2nat with lam = 2^k turns it into the level's natural
(2^k V, 2^k U, H/2^k, W/2^k) windows (Fig. 7b).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BipyramidFusion(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.fuse = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))

    def upsample(self, feat: torch.Tensor, k: int, size: tuple[int, int]) -> torch.Tensor:
        """(N, C, h, w) at level k -> (N, C, H, W) at the finest resolution, geometry-preserving:
        scale 2^k (so grid centres stay put), then crop to the finest map's size."""
        if k == 0:
            return feat
        up = F.interpolate(feat, scale_factor=2.0**k, mode="bilinear", align_corners=False, recompute_scale_factor=False)
        return up[:, :, : size[0], : size[1]]

    def forward(self, mask_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """per level (N, C, H_k, W_k) -> per level (N, C, H_0, W_0)."""
        finest = mask_feats[0]
        size = finest.shape[-2:]
        return [self.fuse(self.upsample(f, k, size) + finest) for k, f in enumerate(mask_feats)]

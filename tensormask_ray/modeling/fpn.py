"""Feature pyramid P{min_level}..P{max_level} (paper §4.2, following RetinaNet).

Top-down and lateral connections are AVERAGED rather than summed, which the paper found to
stabilise training. P6 is a stride-2 3x3 conv on C5 and P7 one on ReLU(P6), as in RetinaNet.
Every level has C channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    def __init__(
        self,
        in_channels: dict[str, int],
        channels: int,
        min_level: int,
        max_level: int,
        fuse: str,
    ):
        super().__init__()
        if fuse not in ("avg", "sum"):
            raise ValueError(f"fuse must be 'avg' or 'sum', got {fuse!r}")
        self.min_level, self.max_level, self.fuse = min_level, max_level, fuse
        self.lateral_levels = list(range(min_level, min(max_level, 5) + 1))  # from C_l, l <= 5
        self.lateral = nn.ModuleList(
            nn.Conv2d(in_channels[f"C{lv}"], channels, 1) for lv in self.lateral_levels
        )
        self.output = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=1) for _ in self.lateral_levels
        )
        self.p6 = (
            nn.Conv2d(in_channels["C5"], channels, 3, stride=2, padding=1)
            if max_level >= 6
            else None
        )
        self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if max_level >= 7 else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    @property
    def strides(self) -> list[int]:
        return [2**lv for lv in range(self.min_level, self.max_level + 1)]

    def forward(self, feats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """{"C2".."C5"} -> [P_min, ..., P_max], each (N, C, H/2^l, W/2^l)."""
        laterals = [conv(feats[f"C{lv}"]) for conv, lv in zip(self.lateral, self.lateral_levels)]
        merged = [laterals[-1]]
        for lat in reversed(laterals[:-1]):
            top_down = F.interpolate(merged[0], size=lat.shape[-2:], mode="nearest")
            merged.insert(0, (lat + top_down) / 2 if self.fuse == "avg" else lat + top_down)
        outs = [conv(x) for conv, x in zip(self.output, merged)]
        if self.p6 is not None:
            p6 = self.p6(feats["C5"])
            outs.append(p6)
            if self.p7 is not None:
                outs.append(self.p7(F.relu(p6)))
        return outs

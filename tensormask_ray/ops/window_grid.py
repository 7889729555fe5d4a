"""Resizing the window grid (V, U) of a 5-D mask tensor (N, V, U, H, W): the one plain-PyTorch
step shared by the references (up_align2nat = resize + align2nat) and the upscale-natural head
(Fig. 6c: the coarse natural masks resized). It needs no fused kernel: ATen's interpolate is one pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_window_grid(x: torch.Tensor, out_size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resizes the (V, U) axes of (N, V, U, H, W) exactly as F.interpolate(align_corners=False)."""
    N, V, U, H, W = x.shape
    Vo, Uo = out_size
    t = x.permute(0, 3, 4, 1, 2).reshape(N * H * W, 1, V, U)
    if mode == "bilinear":
        t = F.interpolate(t, size=(Vo, Uo), mode="bilinear", align_corners=False)
    elif mode == "nearest":
        t = F.interpolate(t, size=(Vo, Uo), mode="nearest")
    else:
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    return t.reshape(N, H, W, Vo, Uo).permute(0, 3, 4, 1, 2)  # (N, Vo, Uo, H, W)

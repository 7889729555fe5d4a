"""Sparse window decoding: the natural-representation mask of a few chosen windows, computed
straight from a head's pre-op tensor, with the same arithmetic as the dense ops.

All the mask ops of the paper are one resampling (see `WindowOp`):

    out[n, v', u', y', x'] = interp(x[n, :, :, Y, X])(v', u')      (pad_value if (Y, X) is outside)
    Y = stride * y' + alpha * (v' - Vo//2),   X = stride * x' + alpha * (u' - Uo//2)

with `interp` resizing the (V, U) grid to (Vo, Uo) (identity when equal). align2nat is
alpha = a, stride 1; up_align2nat is alpha 1 with a resize; swap_align2nat is bilinear, Vo = lam*V,
alpha 1, stride lam; a natural head is alpha 0. Inference needs masks only for the <= 100 windows
that survive NMS, not for the >100k windows of a dense output (paper §5.2): `decode_windows` gathers
just those, so its cost is O(K * Vo * Uo) for K windows.

Index and weight math replicates ATen's upsample kernels (and csrc/), so that the sparse result is
equal to the dense op's output at those windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import api, reference


@dataclass(frozen=True)
class WindowOp:
    """How a head's tensor (N, V, U, H, W) becomes natural windows (N, Vo, Uo, ceil(H/s), ceil(W/s))."""

    out_size: tuple[int, int]  # (Vo, Uo)
    alpha: int = 1  # 0: natural (no shift); a > 0: aligned input, align2nat with alpha = a
    stride: int = 1  # subsampling of (H, W): lam for swap_align2nat
    mode: str = "bilinear"  # interpolation of (V, U) when (Vo, Uo) != (V, U)

    def dense(self, x: torch.Tensor, pad_value: float) -> torch.Tensor:
        """(N, V, U, H, W) -> (N, Vo, Uo, ceil(H/stride), ceil(W/stride)) with the fused ops."""
        N, V, U, H, W = x.shape
        Vo, Uo = self.out_size
        same = (Vo, Uo) == (V, U)
        if self.stride > 1:
            if self.alpha != 1 or self.mode != "bilinear" or (Vo, Uo) != (self.stride * V, self.stride * U):
                raise ValueError(f"{self}: stride > 1 is swap_align2nat (bilinear, alpha 1, lam x size)")
            return api.swap_align2nat(x, self.stride, pad_value)
        if self.alpha == 0:
            return x if same else reference.resize_window_grid(x, (Vo, Uo), self.mode)
        if same:
            return api.align2nat(x, self.alpha, pad_value)
        if self.alpha != 1:
            raise ValueError(f"{self}: resizing is only defined with alpha = 1 (up_align2nat)")
        return api.up_align2nat(x, (Vo, Uo), self.mode, pad_value)


def _axis_table(in_size: int, out_size: int, mode: str, dtype: torch.dtype, device):
    """Per output index: (index0, index1, weight0, weight1), as ATen computes them."""
    dst = torch.arange(out_size, device=device)
    if out_size == in_size:
        i0 = dst
        return i0, i0, torch.ones(out_size, dtype=dtype, device=device), torch.zeros(out_size, dtype=dtype, device=device)
    if mode == "nearest":
        # ATen: float scale = in/out; src = min(floor(dst * scale), in - 1), in float32.
        scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
        i0 = torch.floor(dst.to(torch.float32) * scale.to(device)).long().clamp(max=in_size - 1)
        return i0, i0, torch.ones(out_size, dtype=dtype, device=device), torch.zeros(out_size, dtype=dtype, device=device)
    if mode != "bilinear":
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.tensor(in_size, dtype=opmath) / torch.tensor(out_size, dtype=opmath)).to(device)
    src = scale * (dst.to(opmath) + 0.5) - 0.5
    src = torch.where(src < 0, torch.zeros_like(src), src)
    i0 = torch.floor(src.to(torch.float32)).long().clamp(max=in_size - 1)  # ATen uses floorf
    lam1 = (src - i0.to(opmath)).clamp(0, 1)
    lam0 = 1 - lam1
    i1 = i0 + (i0 < in_size - 1).long()
    return i0, i1, lam0.to(dtype), lam1.to(dtype)


def decode_windows(
    x: torch.Tensor,
    op: WindowOp,
    batch_idx: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    pad_value: float = -6.0,
    origin: tuple[int, int] = (0, 0),
    bounds: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Natural masks of K windows. x: (N, V, U, H, W); batch_idx, ys, xs: (K,) positions on the
    OUTPUT grid (ceil(H/stride), ceil(W/stride)). Returns (K, Vo, Uo), equal to
    op.dense(x)[batch_idx, :, :, ys, xs].

    x may also be a crop of the full head tensor: `origin` = (row, col) of x[..., 0, 0] in the full
    tensor, `bounds` = the full tensor's (H, W) (what counts as outside, i.e. pad_value). The crop
    must hold every in-bounds position the K windows read."""
    N, V, U, h, w = x.shape
    H, W = bounds if bounds is not None else (h, w)
    oy, ox = origin
    Vo, Uo = op.out_size
    K = batch_idx.numel()
    dev = x.device
    if K == 0:
        return x.new_zeros((0, Vo, Uo))
    v0, v1, wv0, wv1 = _axis_table(V, Vo, op.mode, x.dtype, dev)  # (Vo,)
    u0, u1, wu0, wu1 = _axis_table(U, Uo, op.mode, x.dtype, dev)  # (Uo,)
    dv = op.alpha * (torch.arange(Vo, device=dev) - Vo // 2)  # (Vo,)
    du = op.alpha * (torch.arange(Uo, device=dev) - Uo // 2)  # (Uo,)
    Y = (op.stride * ys.long())[:, None] + dv[None, :]  # (K, Vo)
    X = (op.stride * xs.long())[:, None] + du[None, :]  # (K, Uo)
    valid = ((Y >= 0) & (Y < H))[:, :, None] & ((X >= 0) & (X < W))[:, None, :]  # (K, Vo, Uo)
    Yc = (Y.clamp(0, H - 1) - oy).clamp(0, h - 1)[:, :, None]
    Xc = (X.clamp(0, W - 1) - ox).clamp(0, w - 1)[:, None, :]
    n = batch_idx.long()[:, None, None]

    def tap(iv: torch.Tensor, iu: torch.Tensor) -> torch.Tensor:
        return x[n, iv[None, :, None], iu[None, None, :], Yc, Xc]  # (K, Vo, Uo)

    resized = (Vo, Uo) != (V, U)
    if op.mode == "bilinear" and resized and Vo + Uo <= 128:
        # ATen's CPU bilinear takes its channels-last kernel when out_h + out_w <= 128: four taps
        # with product weights, summed left to right.
        w00 = wv0[:, None] * wu0[None, :]
        w01 = wv0[:, None] * wu1[None, :]
        w10 = wv1[:, None] * wu0[None, :]
        w11 = wv1[:, None] * wu1[None, :]
        out = tap(v0, u0) * w00
        out = out + tap(v0, u1) * w01
        out = out + tap(v1, u0) * w10
        out = out + tap(v1, u1) * w11
    else:
        # Otherwise its separable generic kernel: (x00*wu0 + x01*wu1)*wv0 + (x10*wu0 + x11*wu1)*wv1.
        wu0_, wu1_ = wu0[None, None, :], wu1[None, None, :]
        top = tap(v0, u0) * wu0_
        top = top + tap(v0, u1) * wu1_
        bot = tap(v1, u0) * wu0_
        bot = bot + tap(v1, u1) * wu1_
        out = top * wv0[None, :, None]
        out = out + bot * wv1[None, :, None]
    return torch.where(valid, out, out.new_full((), pad_value))  # (K, Vo, Uo)

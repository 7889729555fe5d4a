"""The window op: how a mask head's tensor (N, V, U, H, W) becomes natural-representation masks,
densely (`WindowOp.dense`: the fused ops of tensormask_ray.ops) or at a few chosen windows only
(`decode_windows`, with the same arithmetic as the dense ops). The heads of Fig. 6
(mask_heads.py) each describe theirs as a `WindowOp`.

All the mask ops of the paper are one resampling:

    out[n, v', u', y', x'] = interp(x[n, :, :, Y, X])(v', u')      (pad_value if (Y, X) is outside)
    Y = stride * y' + shift * (v' - Vo//2),   X = stride * x' + shift * (u' - Uo//2)

with `interp` resizing the (V, U) grid to (Vo, Uo) (identity when equal) and shift = alpha for an
aligned tensor, 0 for a natural one. align2nat is alpha = a, stride 1; up_align2nat is alpha 1
with a resize; swap_align2nat is bilinear, Vo = lam*V, alpha 1, stride lam; a natural tensor is
read in place (resized for the upscale-natural head). `geometry="detectron2"` is Detectron2's
swap_align2nat instead (Vo = lam*V, alpha 1, stride lam, its own sampling:
ops.reference.swap_align2nat_detectron2). Inference needs masks only for the <= 100 windows
that survive NMS, not for the >100k windows of a dense output (paper §5.2): `decode_windows` gathers
just those, so its cost is O(K * Vo * Uo) for K windows.

Index and weight math replicates ATen's upsample kernels (and csrc/), so that the sparse result is
equal to the dense op's output at those windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import api
from ..ops.window_grid import resize_window_grid


@dataclass(frozen=True)
class WindowOp:
    """How a head's tensor (N, V, U, H, W) becomes natural windows (N, Vo, Uo, ceil(H/s), ceil(W/s))."""

    out_size: tuple[int, int]  # (Vo, Uo)
    natural: bool = False  # the head's tensor is already natural (no shift); else aligned
    alpha: int = 1  # aligned input: align2nat's alpha (>= 1)
    stride: int = 1  # subsampling of (H, W): lam for swap_align2nat
    mode: str = "bilinear"  # interpolation of (V, U) when (Vo, Uo) != (V, U)
    geometry: str = "paper"  # "detectron2": Detectron2's swap_align2nat with lam = stride

    def __post_init__(self):
        api.check_geometry(self.geometry, "WindowOp")
        if self.alpha < 1:
            raise ValueError(f"{self}: alpha must be >= 1 (a natural head says natural=True)")
        if self.natural and (self.stride != 1 or self.geometry != "paper"):
            raise ValueError(
                f"{self}: a natural head's tensor is read in place (stride 1, paper geometry)"
            )
        if self.geometry == "detectron2" and (self.alpha != 1 or self.mode != "bilinear"):
            raise ValueError(f"{self}: geometry 'detectron2' is swap_align2nat (alpha 1, bilinear)")

    @property
    def shift(self) -> int:
        """Position-grid offset per window cell: 0 for a natural tensor, alpha for an aligned one."""
        return 0 if self.natural else self.alpha

    def _check_detectron2(self, V: int, U: int) -> None:
        if tuple(self.out_size) != (self.stride * V, self.stride * U):
            raise ValueError(
                f"{self}: geometry 'detectron2' needs out_size = stride * (V, U) = "
                f"{(self.stride * V, self.stride * U)} for a (V, U) = {(V, U)} head"
            )

    def dense(self, x: torch.Tensor, pad_value: float) -> torch.Tensor:
        """(N, V, U, H, W) -> (N, Vo, Uo, ceil(H/stride), ceil(W/stride)) with the fused ops."""
        N, V, U, H, W = x.shape
        Vo, Uo = self.out_size
        same = (Vo, Uo) == (V, U)
        if self.geometry == "detectron2":
            self._check_detectron2(V, U)
            return api.swap_align2nat(x, self.stride, pad_value, geometry="detectron2")
        if self.stride > 1:
            if (
                self.alpha != 1
                or self.mode != "bilinear"
                or (Vo, Uo) != (self.stride * V, self.stride * U)
            ):
                raise ValueError(
                    f"{self}: stride > 1 is swap_align2nat (bilinear, alpha 1, lam x size)"
                )
            return api.swap_align2nat(x, self.stride, pad_value)
        if self.natural:
            return x if same else resize_window_grid(x, (Vo, Uo), self.mode)
        if same:
            return api.align2nat(x, self.alpha, pad_value)
        if self.alpha != 1:
            raise ValueError(f"{self}: resizing is only defined with alpha = 1 (up_align2nat)")
        return api.up_align2nat(x, (Vo, Uo), self.mode, pad_value)

    def footprints(
        self, ys: torch.Tensor, xs: torch.Tensor, bounds: tuple[int, int]
    ) -> torch.Tensor:
        """Rows and columns of the (full) head tensor that windows (ys, xs) (K,) of the output grid
        read: (K, 4) [r0, r1, c0, c1), clipped to bounds = the tensor's (H, W). The crop
        [r0, r1) x [c0, c1) holds every in-bounds position the windows read (the bounding box:
        with alpha > 1 the rows in between are not all read)."""
        H, W = bounds
        Vo, Uo = self.out_size
        ys, xs = ys.long(), xs.long()
        if self.geometry == "detectron2":
            # rows lam*y' + v' - Vo//2 (+ 1 when Vo is even: half-pixel pairs), v' in [0, Vo)
            r0 = self.stride * ys - Vo // 2
            r1 = r0 + Vo + (Vo % 2 == 0)
            c0 = self.stride * xs - Uo // 2
            c1 = c0 + Uo + (Uo % 2 == 0)
        else:
            # rows stride*y' + shift*(v' - Vo//2), v' in [0, Vo)
            r0 = self.stride * ys - self.shift * (Vo // 2)
            r1 = r0 + self.shift * (Vo - 1) + 1
            c0 = self.stride * xs - self.shift * (Uo // 2)
            c1 = c0 + self.shift * (Uo - 1) + 1
        return torch.stack([r0.clamp(0, H), r1.clamp(0, H), c0.clamp(0, W), c1.clamp(0, W)], dim=1)


def _axis_table(in_size: int, out_size: int, mode: str, dtype: torch.dtype, device):
    """Per output index: (index0, index1, weight0, weight1), as ATen computes them."""
    dst = torch.arange(out_size, device=device)
    if out_size == in_size:
        i0 = dst
        return (
            i0,
            i0,
            torch.ones(out_size, dtype=dtype, device=device),
            torch.zeros(out_size, dtype=dtype, device=device),
        )
    if mode == "nearest":
        # ATen: float scale = in/out; src = min(floor(dst * scale), in - 1), in float32.
        scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(
            out_size, dtype=torch.float32
        )
        i0 = torch.floor(dst.to(torch.float32) * scale.to(device)).long().clamp(max=in_size - 1)
        return (
            i0,
            i0,
            torch.ones(out_size, dtype=dtype, device=device),
            torch.zeros(out_size, dtype=dtype, device=device),
        )
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
    pad_value: float,
    origin: tuple[int, int] = (0, 0),
    bounds: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Natural masks of K windows. x: (N, V, U, H, W); batch_idx, ys, xs: (K,) positions on the
    OUTPUT grid (ceil(H/stride), ceil(W/stride)). Returns (K, Vo, Uo), equal to
    op.dense(x)[batch_idx, :, :, ys, xs].

    x may also be a crop of the full head tensor: `origin` = (row, col) of x[..., 0, 0] in the full
    tensor, `bounds` = the full tensor's (H, W) (what counts as outside, i.e. pad_value). The crop
    must hold every in-bounds position the K windows read (`op.footprints`)."""
    if op.geometry == "detectron2":
        return _decode_detectron2(x, op, batch_idx, ys, xs, pad_value, origin, bounds)
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
    dv = op.shift * (torch.arange(Vo, device=dev) - Vo // 2)  # (Vo,)
    du = op.shift * (torch.arange(Uo, device=dev) - Uo // 2)  # (Uo,)
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


def _decode_detectron2(
    x: torch.Tensor,
    op: WindowOp,
    batch_idx: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    pad_value: float,
    origin: tuple[int, int],
    bounds: tuple[int, int] | None,
) -> torch.Tensor:
    """decode_windows for geometry 'detectron2': the 16 weighted taps of
    ops.reference.swap_align2nat_detectron2 at K windows, in its order and precision (so equal to
    the dense op bit for bit). A tap outside bounds or the window grid reads pad_value."""
    N, V, U, h, w = x.shape
    op._check_detectron2(V, U)
    H, W = bounds if bounds is not None else (h, w)
    oy0, ox0 = origin
    lam = op.stride
    Vo, Uo = op.out_size
    K = batch_idx.numel()
    if K == 0:
        return x.new_zeros((0, Vo, Uo))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device

    def axis(o: torch.Tensor):
        f = torch.floor(o)
        wc = o - f
        return f.long(), torch.ceil(o).long(), 1 - wc, wc  # floor, ceil, w_floor, w_ceil

    v_ = torch.arange(Vo, dtype=dtype)
    u_ = torch.arange(Uo, dtype=dtype)
    oy = ys.to(dtype)[:, None] * lam + v_.to(dev)[None, :] - Vo / 2 + 0.5  # (K, Vo), exact
    ox = xs.to(dtype)[:, None] * lam + u_.to(dev)[None, :] - Uo / 2 + 0.5  # (K, Uo), exact
    yf, yc, ywf, ywc = (t[:, :, None] for t in axis(oy))  # (K, Vo, 1)
    xf, xc, xwf, xwc = (t[:, None, :] for t in axis(ox))  # (K, 1, Uo)
    # The window taps divide by lam: on the CPU, where the division is correctly rounded as in
    # the kernels (ATen's CUDA division by a scalar multiplies by its reciprocal).
    vf, vc, vwf, vwc = (
        t.to(dev)[None, :, None] for t in axis((v_ + 0.5) / lam - 0.5)
    )  # (1, Vo, 1)
    uf, uc, uwf, uwc = (
        t.to(dev)[None, None, :] for t in axis((u_ + 0.5) / lam - 0.5)
    )  # (1, 1, Uo)
    n = batch_idx.long()[:, None, None]
    xx = x.to(dtype)
    pad = torch.tensor(pad_value, dtype=dtype, device=dev)

    def tap(v, u, Y, X) -> torch.Tensor:  # -> (K, Vo, Uo)
        inside = (v >= 0) & (v < V) & (u >= 0) & (u < U) & (Y >= 0) & (Y < H) & (X >= 0) & (X < W)
        val = xx[
            n,
            v.clamp(0, V - 1),
            u.clamp(0, U - 1),
            (Y - oy0).clamp(0, h - 1),
            (X - ox0).clamp(0, w - 1),
        ]
        return torch.where(inside, val, pad)

    out = torch.zeros((K, Vo, Uo), dtype=dtype, device=dev)
    for Y, wy in ((yf, ywf), (yc, ywc)):
        for X, wx in ((xf, xwf), (xc, xwc)):
            for v, wv in ((vf, vwf), (vc, vwc)):
                for u, wu in ((uf, uwf), (uc, uwc)):
                    out = out + wy * wx * wv * wu * tap(v, u, Y, X)
    return out.to(x.dtype)  # (K, Vo, Uo)

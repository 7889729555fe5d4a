"""TEMPORARY stand-in for the op API of the `ops` branch (issue 13, Part 1), until it is merged:
`WindowOp(..., geometry="paper"|"detectron2")`, `WindowOp.footprints`, and `decode_windows` /
`WindowOp.dense` for Detectron2's swap_align2nat, in plain PyTorch. `install()` patches them in
only when tensormask_ray.ops.sparse.WindowOp has no `geometry` field; delete this file once the
ops branch is merged."""

from __future__ import annotations

import dataclasses

import torch


def _d2_dense(x: torch.Tensor, lam: int, pad_value: float) -> torch.Tensor:
    from tests.detectron2_reference import swap_align2nat

    N, V, U, H, W = x.shape
    out = swap_align2nat(x.reshape(N, V * U, H, W), lam, pad_value)
    return out.view(N, lam * V, lam * U, *out.shape[-2:])


def _d2_decode(x, op, batch_idx, ys, xs, pad_value, origin, bounds):
    N, V, U, h, w = x.shape
    H, W = bounds if bounds is not None else (h, w)
    oy0, ox0 = origin
    lam, (Vo, Uo) = op.stride, op.out_size
    if batch_idx.numel() == 0:
        return x.new_zeros((0, Vo, Uo))
    f32 = torch.float32
    v_, u_ = torch.arange(Vo, dtype=f32), torch.arange(Uo, dtype=f32)

    def axis(o):
        f = torch.floor(o)
        return f.long(), torch.ceil(o).long(), 1 - (o - f), o - f

    yf, yc, ywf, ywc = (t[:, :, None] for t in axis(ys.float()[:, None] * lam + v_ - Vo / 2 + 0.5))
    xf, xc, xwf, xwc = (t[:, None, :] for t in axis(xs.float()[:, None] * lam + u_ - Uo / 2 + 0.5))
    vf, vc, vwf, vwc = (t[None, :, None] for t in axis(((v_.double() + 0.5) / lam - 0.5).float()))
    uf, uc, uwf, uwc = (t[None, None, :] for t in axis(((u_.double() + 0.5) / lam - 0.5).float()))
    n = batch_idx.long()[:, None, None]

    def tap(v, u, Y, X):
        inside = (v >= 0) & (v < V) & (u >= 0) & (u < U) & (Y >= 0) & (Y < H) & (X >= 0) & (X < W)
        val = x[n, v.clamp(0, V - 1), u.clamp(0, U - 1), (Y - oy0).clamp(0, h - 1), (X - ox0).clamp(0, w - 1)]
        return torch.where(inside, val, torch.full_like(val, pad_value))

    out = None
    for Y, wy in ((yf, ywf), (yc, ywc)):
        for X, wx in ((xf, xwf), (xc, xwc)):
            for v, wv in ((vf, vwf), (vc, vwc)):
                for u, wu in ((uf, uwf), (uc, uwc)):
                    term = (wy * wx * wv * wu).to(x.dtype) * tap(v, u, Y, X)
                    out = term if out is None else out + term
    return out


def install() -> None:
    from tensormask_ray.modeling import tensormask, windows
    from tensormask_ray.ops import sparse

    if "geometry" in {f.name for f in dataclasses.fields(sparse.WindowOp)}:
        return  # the real API is there
    base_decode = sparse.decode_windows

    @dataclasses.dataclass(frozen=True)
    class WindowOp(sparse.WindowOp):
        geometry: str = "paper"

        def dense(self, x, pad_value):
            if self.geometry == "detectron2":
                return _d2_dense(x, self.stride, pad_value)
            return super().dense(x, pad_value)

        def footprints(self, ys, xs, bounds):
            H, W = bounds
            Vo, Uo = self.out_size
            ys, xs = ys.long(), xs.long()
            if self.geometry == "detectron2":
                r0 = self.stride * ys - Vo // 2
                r1 = r0 + Vo + (Vo % 2 == 0)
                c0 = self.stride * xs - Uo // 2
                c1 = c0 + Uo + (Uo % 2 == 0)
            else:
                r0 = self.stride * ys - self.alpha * (Vo // 2)
                r1 = r0 + self.alpha * (Vo - 1) + 1
                c0 = self.stride * xs - self.alpha * (Uo // 2)
                c1 = c0 + self.alpha * (Uo - 1) + 1
            return torch.stack([r0.clamp(0, H), r1.clamp(0, H), c0.clamp(0, W), c1.clamp(0, W)], dim=1)

    def decode_windows(x, op, batch_idx, ys, xs, pad_value=-6.0, origin=(0, 0), bounds=None):
        if getattr(op, "geometry", "paper") == "detectron2":
            return _d2_decode(x, op, batch_idx, ys, xs, pad_value, origin, bounds)
        return base_decode(x, op, batch_idx, ys, xs, pad_value, origin, bounds)

    sparse.WindowOp = windows.WindowOp = WindowOp
    sparse.decode_windows = tensormask.decode_windows = decode_windows

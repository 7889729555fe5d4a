"""Slow, obviously-correct references for the TensorMask tensor ops (paper §3).

Each function composes the paper's conceptual steps literally (interpolate on (V, U), gather on
(H, W), subsample), in plain differentiable PyTorch. They are the ground truth the fused kernels in
csrc/ are tested against, and the backend selected by TENSORMASK_OPS=reference.

Shapes: 5-D (N, V, U, H, W); (V, U) is the window grid, (H, W) the position grid. Window offsets are
centred: index v means offset v - V//2. A read outside [0, H) x [0, W) returns `pad_value`.
"""

from __future__ import annotations

import torch

from .window_grid import resize_window_grid


def _shift_gather(x: torch.Tensor, step_v: int, step_u: int, pad_value: float) -> torch.Tensor:
    """out[n,v,u,y,x] = x[n,v,u, y + step_v*(v - V//2), x + step_u*(u - U//2)], pad outside."""
    N, V, U, H, W = x.shape  # (N, V, U, H, W)
    dev = x.device
    ys = (
        torch.arange(H, device=dev)[None, :]
        + step_v * (torch.arange(V, device=dev) - V // 2)[:, None]
    )  # (V, H)
    xs = (
        torch.arange(W, device=dev)[None, :]
        + step_u * (torch.arange(U, device=dev) - U // 2)[:, None]
    )  # (U, W)
    valid = ((ys >= 0) & (ys < H)).view(1, V, 1, H, 1) & ((xs >= 0) & (xs < W)).view(1, 1, U, 1, W)
    idx_y = ys.clamp(0, H - 1).view(1, V, 1, H, 1).expand(N, V, U, H, W)
    idx_x = xs.clamp(0, W - 1).view(1, 1, U, 1, W).expand(N, V, U, H, W)
    out = x.gather(3, idx_y).gather(4, idx_x)
    return torch.where(valid, out, out.new_full((), pad_value))  # (N, V, U, H, W)


def align2nat(x: torch.Tensor, alpha: int, pad_value: float) -> torch.Tensor:
    """Aligned -> natural, eq. (1): out[n,v,u,y,x] = x[n,v,u, y+alpha*(v-V//2), x+alpha*(u-U//2)]."""
    return _shift_gather(x, alpha, alpha, pad_value)


def nat2align(x: torch.Tensor, alpha: int, pad_value: float) -> torch.Tensor:
    """Natural -> aligned: out[n,v,u,y,x] = x[n,v,u, y-alpha*(v-V//2), x-alpha*(u-U//2)]."""
    return _shift_gather(x, -alpha, -alpha, pad_value)


def up_align2nat(
    x: torch.Tensor, out_size: tuple[int, int], mode: str, pad_value: float
) -> torch.Tensor:
    """§3.5 / Fig. 4: resize (V, U) to `out_size` (coarse aligned -> fine aligned), then align2nat."""
    return align2nat(resize_window_grid(x, out_size, mode), 1, pad_value)  # (N, Vo, Uo, H, W)


def swap_align2nat(x: torch.Tensor, lam: int, pad_value: float) -> torch.Tensor:
    """§3.6 / Fig. 5: up_align2nat by lam (bilinear), then subsample (H, W) by lam.

    (N, V, U, H, W) -> (N, lam*V, lam*U, ceil(H/lam), ceil(W/lam)). This reference materialises the
    (N, lam*V, lam*U, H, W) intermediate, lam^2 times the input: use it on small inputs only.
    """
    N, V, U, H, W = x.shape
    full = up_align2nat(x, (lam * V, lam * U), "bilinear", pad_value)  # (N, lam*V, lam*U, H, W)
    return full[..., ::lam, ::lam]  # (N, lam*V, lam*U, ceil(H/lam), ceil(W/lam))


def swap_align2nat_detectron2(x: torch.Tensor, lam: int, pad_value: float) -> torch.Tensor:
    """Detectron2's swap_align2nat (projects/TensorMask, SwapAlign2Nat_cuda.cu), written straight
    from its formula. (N, V, U, H, W) -> (N, lam*V, lam*U, ceil(H/lam), ceil(W/lam)).

        oy = y'*lam + v' - Vo/2 + 0.5,  ox = x'*lam + u' - Uo/2 + 0.5   (Vo = lam*V, Uo = lam*U)
        ov = (v' + 0.5)/lam - 0.5,      ou = (u' + 0.5)/lam - 0.5
        out = sum over (yf|yc, xf|xc, vf|vc, uf|uc) of  wy * wx * wv * wu * x[n, v*, u*, y*, x*]

    with f = floor, c = ceil, w_c = o - floor(o), w_f = 1 - w_c, and pad_value for a tap with any
    index outside its axis. Unlike the paper op it samples half-pixel rows/columns (Vo even) and
    does not clamp the window grid at its rim. Computed in float64 for float64 input, float32
    otherwise, each product and sum rounded once, terms added in the order above (y outermost).
    """
    N, V, U, H, W = x.shape
    Vo, Uo, Ho, Wo = lam * V, lam * U, -(-H // lam), -(-W // lam)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device

    def ar(n: int) -> torch.Tensor:
        return torch.arange(n, dtype=dtype, device=dev)

    def taps(o: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """[(floor, w_floor, inside), (ceil, w_ceil, inside)] of an axis of length `size`, each
        flattened over (Vo, Uo, Ho, Wo)."""
        o = o.expand(Vo, Uo, Ho, Wo).reshape(-1)
        f = torch.floor(o)
        wc = o - f
        f, c = f.long(), torch.ceil(o).long()
        return [(f, 1 - wc, (f >= 0) & (f < size)), (c, wc, (c >= 0) & (c < size))]

    ys = taps(ar(Ho).view(1, 1, Ho, 1) * lam + ar(Vo).view(Vo, 1, 1, 1) - Vo / 2 + 0.5, H)
    xs = taps(ar(Wo).view(1, 1, 1, Wo) * lam + ar(Uo).view(1, Uo, 1, 1) - Uo / 2 + 0.5, W)
    vs = taps((ar(Vo).view(Vo, 1, 1, 1) + 0.5) / lam - 0.5, V)
    us = taps((ar(Uo).view(1, Uo, 1, 1) + 0.5) / lam - 0.5, U)

    flat = x.to(dtype).reshape(N, V * U * H * W)
    pad = torch.tensor(pad_value, dtype=dtype, device=dev)
    out = torch.zeros((N, Vo * Uo * Ho * Wo), dtype=dtype, device=dev)
    for y, wy, y_in in ys:
        for xi, wx, x_in in xs:
            for v, wv, v_in in vs:
                for u, wu, u_in in us:
                    inside = y_in & x_in & v_in & u_in
                    index = torch.where(inside, ((v * U + u) * H + y) * W + xi, 0)
                    value = torch.where(inside, flat[:, index], pad)  # x[n, v*, u*, y*, x*] or pad
                    out = out + wy * wx * wv * wu * value
    return out.view(N, Vo, Uo, Ho, Wo).to(x.dtype)  # (N, Vo, Uo, Ho, Wo)

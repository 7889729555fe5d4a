"""The public tensor ops: thin, validated wrappers over the registered `torch.ops.tensormask.*`.

Backend: the fused C++/CUDA kernels of csrc/ (built into `tensormask_ray._C`) by default. Setting
the environment variable TENSORMASK_OPS=reference selects the pure-PyTorch references instead; that
is an explicit opt-in. If the extension is missing or broken and no opt-in is given, the first op
call raises an error that says why: there is no silent fallback.

Shapes: 5-D (N, V, U, H, W); (V, U) is the window grid, (H, W) the position grid.
`pad_value` (what a read outside the position grid returns) has no default here: the model passes
its `model.pad_value`, whose one default is in config.py.
"""

from __future__ import annotations

import math
import os

import torch

from . import reference

BACKEND_ENV = "TENSORMASK_OPS"
_BACKENDS = ("fused", "reference")


def backend() -> str:
    """'fused' (the csrc/ kernels, default) or 'reference' (TENSORMASK_OPS=reference)."""
    name = os.environ.get(BACKEND_ENV, "fused").strip().lower() or "fused"
    if name not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={name!r}: expected one of {list(_BACKENDS)}")
    return name


def _use_fused() -> bool:
    if backend() == "reference":
        return False
    from . import library  # loads tensormask_ray._C and registers fake/autograd; raises if missing

    library.ensure_loaded()
    return True


def _check_5d(x: torch.Tensor, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected a tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"{op}: expected a 5-D (N, V, U, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: expected a floating-point tensor, got {x.dtype}")


def _check_pos_int(value, name: str, op: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    return value


def align2nat(x: torch.Tensor, alpha: int, pad_value: float) -> torch.Tensor:
    """Aligned -> natural (eq. 1). (N, V, U, H, W) -> (N, V, U, H, W).

    out[n,v,u,y,x] = x[n, v, u, y + alpha*(v - V//2), x + alpha*(u - U//2)], pad_value outside.
    """
    _check_5d(x, "align2nat")
    alpha = _check_pos_int(alpha, "alpha", "align2nat")
    if _use_fused():
        return torch.ops.tensormask.align2nat(x, alpha, float(pad_value))
    return reference.align2nat(x, alpha, pad_value)


def nat2align(x: torch.Tensor, alpha: int, pad_value: float) -> torch.Tensor:
    """Natural -> aligned. (N, V, U, H, W) -> (N, V, U, H, W).

    out[n,v,u,y,x] = x[n, v, u, y - alpha*(v - V//2), x - alpha*(u - U//2)], pad_value outside.
    """
    _check_5d(x, "nat2align")
    alpha = _check_pos_int(alpha, "alpha", "nat2align")
    if _use_fused():
        return torch.ops.tensormask.nat2align(x, alpha, float(pad_value))
    return reference.nat2align(x, alpha, pad_value)


def up_align2nat(
    x: torch.Tensor,
    out_size: tuple[int, int] | int,
    mode: str,
    pad_value: float,
) -> torch.Tensor:
    """Coarse aligned -> fine natural (§3.5). (N, V, U, H, W) -> (N, Vo, Uo, H, W).

    Resizes (V, U) to out_size as F.interpolate(mode, align_corners=False) would (any ratio,
    e.g. 10 -> 15 for lambda = 1.5), then align2nat with alpha = 1.
    """
    _check_5d(x, "up_align2nat")
    if isinstance(out_size, int):
        out_size = (out_size, out_size)
    out_v, out_u = (
        _check_pos_int(int(s) if not isinstance(s, bool) else s, "out_size", "up_align2nat")
        for s in out_size
    )
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"up_align2nat: mode must be 'bilinear' or 'nearest', got {mode!r}")
    if _use_fused():
        return torch.ops.tensormask.up_align2nat(x, out_v, out_u, mode, float(pad_value))
    return reference.up_align2nat(x, (out_v, out_u), mode, pad_value)


GEOMETRIES = ("paper", "detectron2")


def check_geometry(geometry: str, where: str) -> str:
    """`geometry` if it names a swap_align2nat geometry, else ValueError naming it and `where`."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"{where}: geometry must be one of {list(GEOMETRIES)}, got {geometry!r}")
    return geometry


def swap_align2nat(
    x: torch.Tensor, lam: int, pad_value: float, geometry: str = "paper"
) -> torch.Tensor:
    """Tensor-bipyramid op (§3.6). (N, V, U, H, W) -> (N, lam*V, lam*U, ceil(H/lam), ceil(W/lam)).

    geometry="paper": equal to up_align2nat(x, (lam*V, lam*U), 'bilinear')[..., ::lam, ::lam],
    computed by one op in O(N*V*U*H*W) time and memory whatever lam (the intermediate is never
    materialised).
    geometry="detectron2": Detectron2's SwapAlign2Nat (reference.swap_align2nat_detectron2):
    half-pixel spatial sampling (rows/columns averaged in pairs when lam*V / lam*U is even) and
    pad_value, not clamping, for taps beyond the window grid's rim. Equal to the paper geometry
    when lam = 1 and V, U are odd.
    """
    _check_5d(x, "swap_align2nat")
    lam = _check_pos_int(lam, "lam", "swap_align2nat")
    check_geometry(geometry, "swap_align2nat")
    if geometry == "detectron2":
        if _use_fused():
            return torch.ops.tensormask.swap_align2nat_detectron2(x, lam, float(pad_value))
        return reference.swap_align2nat_detectron2(x, lam, pad_value)
    if _use_fused():
        return torch.ops.tensormask.swap_align2nat(x, lam, float(pad_value))
    return reference.swap_align2nat(x, lam, pad_value)


def swap_output_shape(shape: tuple[int, ...], lam: int) -> tuple[int, int, int, int, int]:
    N, V, U, H, W = shape
    return (N, lam * V, lam * U, math.ceil(H / lam), math.ceil(W / lam))

"""Fused forward kernels (CPU) against the pure-PyTorch references."""

from __future__ import annotations

import math

import pytest
import torch

from tensormask_ray.ops import api
from tensormask_ray.ops import reference as ref

from ._cases import (
    OPS,
    d2_case,
    forward_cases,
    kernel_results,
    rand,
    requires_ext,
    run_child,
    swap_case,
    up_case,
)

pytestmark = requires_ext

CASES = forward_cases()


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_forward_float64_equals_reference_exactly(case):
    x = rand(case.shape, torch.float64, seed=1)
    out = case.fused(x)
    expected = case.reference(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert torch.equal(out, expected), f"max abs diff {(out - expected).abs().max().item()}"


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_forward_float32_matches_reference(case):
    x = rand(case.shape, torch.float32, seed=2)
    torch.testing.assert_close(case.fused(x), case.reference(x), rtol=1e-5, atol=0)


NON_CONTIGUOUS = [
    swap_case(2, 5, 3),
    swap_case(3, 3, 3),
    up_case(10, 10, (15, 15), "bilinear"),
    up_case(5, 3, (9, 7), "nearest"),
    up_case(3, 3, (70, 70), "bilinear"),
]


@pytest.mark.parametrize("case", NON_CONTIGUOUS, ids=repr)
@pytest.mark.parametrize("view", ["permuted", "sliced"])
def test_non_contiguous_input(case, view):
    N, V, U, H, W = case.shape
    if view == "permuted":  # (N, V, U, W, H) storage seen as (N, V, U, H, W)
        x = rand((N, V, U, W, H), seed=3).transpose(3, 4)
    else:  # every other element along W, and along N
        x = rand((2 * N, V, U, H, 2 * W), seed=3)[::2, ..., ::2]
    assert not x.is_contiguous()
    assert torch.equal(case.fused(x), case.reference(x))


@pytest.mark.parametrize("alpha", [1, 2])
@pytest.mark.parametrize("op", ["align2nat", "nat2align"])
def test_shift_ops_on_non_contiguous_input(op, alpha):
    x = rand((2, 5, 3, 8, 14), seed=4)[..., ::2]
    assert torch.equal(getattr(OPS, op)(x, alpha, -1.0), getattr(ref, op)(x, alpha, -1.0))


@pytest.mark.parametrize("alpha", [1, 2])
@pytest.mark.parametrize("window", [(5, 5), (5, 3), (4, 6)])
def test_nat2align_inverts_align2nat_where_no_padding_was_read(alpha, window):
    V, U = window
    N, H, W = 2, 9, 11
    x = rand((N, V, U, H, W), seed=5)
    back = OPS.nat2align(OPS.align2nat(x, alpha, -6.0), alpha, -6.0)
    # back[y] = x[y] iff the intermediate position y - alpha*(v - V//2) was inside (no pad read).
    ys = torch.arange(H)[None, :] - alpha * (torch.arange(V) - V // 2)[:, None]  # (V, H)
    xs = torch.arange(W)[None, :] - alpha * (torch.arange(U) - U // 2)[:, None]  # (U, W)
    inside = ((ys >= 0) & (ys < H)).view(1, V, 1, H, 1) & ((xs >= 0) & (xs < W)).view(1, 1, U, 1, W)
    inside = inside.expand_as(x)
    assert inside.any() and not inside.all()
    assert torch.equal(back[inside], x[inside])
    assert torch.all(back[~inside] == -6.0)


def test_swap_output_shape_and_padding():
    x = rand((2, 3, 5, 10, 7), seed=6)
    out = OPS.swap_align2nat(x, 4, 3.25)
    assert out.shape == (2, 12, 20, 3, 2) == api.swap_output_shape(x.shape, 4)
    # The far corner windows read far outside: all pad.
    assert torch.all(out[:, 0, 0, 0, 0] == 3.25)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: OPS.align2nat(x, 2, -6.0),
        lambda x: OPS.nat2align(x, 1, -6.0),
        lambda x: OPS.up_align2nat(x, 6, 4, "bilinear", -6.0),
        lambda x: OPS.swap_align2nat(x, 3, -6.0),
    ],
    ids=["align2nat", "nat2align", "up_align2nat", "swap_align2nat"],
)
@pytest.mark.parametrize("shape", [(0, 3, 3, 4, 4), (2, 3, 3, 0, 5), (2, 3, 3, 4, 0)])
def test_empty_tensors(call, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = call(x)
    assert out.numel() == 0
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_invalid_arguments_raise():
    x = rand((1, 3, 3, 4, 4))
    with pytest.raises(RuntimeError, match="5-D"):
        OPS.swap_align2nat(x[0], 2, -6.0)
    with pytest.raises(RuntimeError, match="lam must be >= 1"):
        OPS.swap_align2nat(x, 0, -6.0)
    with pytest.raises(RuntimeError, match="alpha must be >= 1"):
        OPS.align2nat(x, 0, -6.0)
    with pytest.raises(RuntimeError, match="mode must be"):
        OPS.up_align2nat(x, 5, 5, "bicubic", -6.0)
    with pytest.raises(RuntimeError, match="floating-point"):
        OPS.align2nat(x.long(), 1, -6.0)
    with pytest.raises(RuntimeError, match="expected the forward's output shape"):
        OPS.swap_align2nat_backward(rand((1, 6, 6, 2, 3)), [1, 3, 3, 4, 4], 2)
    with pytest.raises(RuntimeError, match="swap_align2nat_detectron2: lam must be >= 1"):
        OPS.swap_align2nat_detectron2(x, 0, -6.0)
    with pytest.raises(RuntimeError, match="swap_align2nat_detectron2_backward: grad has shape"):
        OPS.swap_align2nat_detectron2_backward(rand((1, 6, 6, 2, 3)), [1, 3, 3, 4, 4], 2)
    with pytest.raises(ValueError, match="geometry must be one of .* got 'Detectron2'"):
        api.swap_align2nat(x, 2, -6.0, geometry="Detectron2")


def _detectron2_scalar(x, lam, pad, n, v, u, y, xo):
    """One output element transcribed from Detectron2's SwapAlign2NatForwardFeat (plain Python
    floats), to check the vectorised reference against the original's own wording."""
    _, V, U, H, W = x.shape
    Vout, Uout = lam * V, lam * U

    def tap(o):
        f, c = math.floor(o), math.ceil(o)
        return f, c, 1.0 - (o - f), o - f

    yf, yc, ywf, ywc = tap(y * lam + v - Vout / 2.0 + 0.5)
    xf, xc, xwf, xwc = tap(xo * lam + u - Uout / 2.0 + 0.5)
    vf, vc, vwf, vwc = tap((v + 0.5) / lam - 0.5)
    uf, uc, uwf, uwc = tap((u + 0.5) / lam - 0.5)

    def get(yy, xx, vv, uu):
        inside = 0 <= yy < H and 0 <= xx < W and 0 <= vv < V and 0 <= uu < U
        return float(x[n, vv, uu, yy, xx]) if inside else pad

    val = 0.0
    for yy, wy in ((yf, ywf), (yc, ywc)):
        for xx, wx in ((xf, xwf), (xc, xwc)):
            for vv, wv in ((vf, vwf), (vc, vwc)):
                for uu, wu in ((uf, uwf), (uc, uwc)):
                    val = val + wy * wx * wv * wu * get(yy, xx, vv, uu)
    return val


@pytest.mark.parametrize(("lam", "V", "U"), [(1, 4, 3), (2, 3, 3), (3, 2, 4)])
def test_detectron2_reference_matches_the_original_formula(lam, V, U):
    x = rand((2, V, U, 2 * lam + 1, 2 * lam + 2), seed=8)
    out = ref.swap_align2nat_detectron2(x, lam, -6.0)
    g = torch.Generator().manual_seed(lam)
    for _ in range(40):
        idx = [int(torch.randint(0, s, (1,), generator=g)) for s in out.shape]
        assert float(out[tuple(idx)]) == _detectron2_scalar(x, lam, -6.0, *idx), idx


@pytest.mark.parametrize("shape", [(2, 5, 3, 7, 6), (1, 1, 1, 3, 2), (2, 15, 15, 9, 8)])
def test_detectron2_geometry_is_the_paper_op_when_lam_is_1_and_the_grid_odd(shape):
    x = rand(shape, seed=9)
    assert torch.equal(OPS.swap_align2nat_detectron2(x, 1, -2.5), OPS.swap_align2nat(x, 1, -2.5))


def test_detectron2_geometry_differs_from_the_paper_op_only_at_the_window_grid_rim():
    """lam*V odd (lam = 3, V = U = 5): same rows and columns as the paper op, the same bilinear
    weights up to rounding; but windows beyond the rim of (V, U) mix in pad_value instead of
    clamping."""
    lam, V = 3, 5
    x = rand((2, V, V, 13, 11), seed=10)
    d2 = OPS.swap_align2nat_detectron2(x, lam, -6.0)
    paper = OPS.swap_align2nat(x, lam, -6.0)
    Vo = lam * V
    ov = (torch.arange(Vo, dtype=torch.float64) + 0.5) / lam - 0.5
    inner = (ov >= 0) & (ov <= V - 1)  # both taps inside the window grid
    Y = lam * torch.arange(d2.shape[3])[None, :] + torch.arange(Vo)[:, None] - Vo // 2  # (Vo, Ho)
    X = lam * torch.arange(d2.shape[4])[None, :] + torch.arange(Vo)[:, None] - Vo // 2  # (Uo, Wo)
    inside = ((Y >= 0) & (Y < 13)).view(1, Vo, 1, -1, 1) & ((X >= 0) & (X < 11)).view(
        1, 1, Vo, 1, -1
    )
    both = inside & inner.view(1, Vo, 1, 1, 1) & inner.view(1, 1, Vo, 1, 1)
    both = both.expand_as(d2)
    assert both.any() and (~inner).any()
    torch.testing.assert_close(d2[both], paper[both], rtol=0, atol=1e-12)
    rim = inside.expand_as(d2) & ~inner.view(1, Vo, 1, 1, 1)
    assert (d2[rim] - paper[rim]).abs().min() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", [d2_case(2, 5, 3), d2_case(1, 4, 4), d2_case(3, 3, 2)], ids=repr)
def test_detectron2_reduced_precision_is_the_float32_sum_rounded_once(case, dtype):
    x = rand(case.shape, torch.float32, seed=7).to(dtype)
    out = case.fused(x)
    assert out.dtype == dtype
    assert torch.equal(out, case.reference(x))


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)], ids=["float16", "bfloat16"]
)
@pytest.mark.parametrize(
    "case",
    [
        swap_case(2, 5, 3),
        swap_case(4, 3, 3),
        up_case(10, 10, (15, 15), "bilinear"),
        up_case(5, 5, (9, 9), "nearest"),
    ],
    ids=repr,
)
def test_reduced_precision_cpu(case, dtype, tol):
    """half/bfloat16 compute in float and round once: within half an ulp of the float32 result."""
    x = rand(case.shape, torch.float32, seed=7).to(dtype)
    out = case.fused(x)
    assert out.dtype == dtype
    expected = case.reference(x.float())
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


_CHILD = r"""
import sys, torch
from tests.ops._cases import kernel_results
torch.save(kernel_results(), sys.argv[1])
"""


@pytest.mark.parametrize(
    "env",
    [{"TENSORMASK_CPU_FMA": "0"}, {"TENSORMASK_CPU_KERNEL": "elementwise"}],
    ids=["baseline-isa-clone", "elementwise-cuda-math"],
)
def test_cpu_kernel_variants_agree_bitwise(env, tmp_path):
    """The other CPU kernel variants give the same bits as the default (row loops, AVX2+FMA clone):
    the baseline-ISA clone (fma through libm), and the per-element forward_element() /
    backward_element() that the CUDA kernels run per thread."""
    path = tmp_path / "results.pt"
    run_child(_CHILD, env, str(path))
    theirs = torch.load(path)
    ours = kernel_results()
    assert theirs.keys() == ours.keys()
    for key, value in ours.items():
        assert torch.equal(theirs[key], value), key

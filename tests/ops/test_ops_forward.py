"""Fused forward kernels (CPU) against the pure-PyTorch references."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tensormask_ray.ops import api
from tensormask_ray.ops import reference as ref

from ._cases import OPS, forward_cases, kernel_results, rand, requires_ext, swap_case, up_case

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
    root = Path(__file__).resolve().parents[2]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORMASK_CPU_")}
    child_env.update(env, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", _CHILD, str(path)], env=child_env, cwd=root, check=True)
    theirs = torch.load(path)
    ours = kernel_results()
    assert theirs.keys() == ours.keys()
    for key, value in ours.items():
        assert torch.equal(theirs[key], value), key

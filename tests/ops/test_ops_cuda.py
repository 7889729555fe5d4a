"""CUDA kernels: registration (checked on every machine) and CUDA == CPU (on a GPU machine).

The CPU and CUDA kernels share csrc/window_math.h, write every multiply-add as an explicit fma and
add the backward's terms in the same order, so they agree bit for bit in every dtype.
"""

from __future__ import annotations

import pytest
import torch

from tensormask_ray.ops import library

from ._cases import (
    BUILT_WITH_CUDA,
    IN_CI,
    OPS,
    d2_case,
    rand,
    requires_cuda,
    requires_ext,
    swap_case,
    up_case,
)

pytestmark = requires_ext

ALL_OPS = library.OPS + library.BACKWARD_OPS


@pytest.mark.parametrize("name", ALL_OPS)
def test_cuda_kernel_registered_when_built_with_cuda(name):
    """`make test` (what CI runs) always compiles the CUDA kernels: in CI an extension without
    them is a broken build, not a skip. Elsewhere a CPU-only build (`make install` without a GPU)
    skips."""
    if not BUILT_WITH_CUDA:
        if IN_CI:
            pytest.fail("CI=true and the extension was built without its CUDA kernels")
        pytest.skip("extension built without a CUDA toolkit")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tensormask::{name}", "CUDA")


@pytest.mark.parametrize("name", ALL_OPS)
def test_cpu_kernel_registered(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tensormask::{name}", "CPU")


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
CUDA_CASES = [
    swap_case(1, 5, 5),
    swap_case(2, 5, 3),
    swap_case(3, 11, 11),
    swap_case(8, 15, 15),
    swap_case(32, 3, 3, N=1, hw=(35, 33)),
    up_case(10, 10, (15, 15), "bilinear"),
    up_case(3, 3, (70, 70), "bilinear"),
    up_case(5, 5, (3, 4), "bilinear"),
    up_case(5, 3, (11, 7), "nearest"),
    up_case(5, 3, (5, 3), "bilinear"),
    d2_case(1, 4, 3),
    d2_case(2, 5, 3),
    d2_case(3, 4, 4),
    d2_case(8, 15, 15, N=1),
    d2_case(32, 3, 2, N=1),
    d2_case(2, 3, 3, hw=(1, 2)),
]
SHIFTS = [
    ("align2nat", 1),
    ("align2nat", 2),
    ("nat2align", 1),
    ("nat2align", 2),
]


def _fwd_bwd(fn, x, grad_out):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (gx,) = torch.autograd.grad(out, x, grad_out)
    return out, gx


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=repr)
def test_cuda_equals_cpu(case, dtype):
    x = rand(case.shape, dtype, seed=31)
    out_cpu = case.fused(x)
    grad_out = rand(out_cpu.shape, dtype, seed=32)
    out_cpu, gx_cpu = _fwd_bwd(case.fused, x, grad_out)
    out_cuda, gx_cuda = _fwd_bwd(case.fused, x.cuda(), grad_out.cuda())
    assert out_cuda.is_cuda and gx_cuda.is_cuda
    assert torch.equal(out_cuda.cpu(), out_cpu)
    assert torch.equal(gx_cuda.cpu(), gx_cpu)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("op", "alpha"), SHIFTS)
def test_cuda_shift_ops_equal_cpu(op, alpha, dtype):
    x = rand((2, 5, 3, 9, 8), dtype, seed=33)
    grad_out = rand(x.shape, dtype, seed=34)

    def fn(t):
        return getattr(OPS, op)(t, alpha, -6.0)

    out_cpu, gx_cpu = _fwd_bwd(fn, x, grad_out)
    out_cuda, gx_cuda = _fwd_bwd(fn, x.cuda(), grad_out.cuda())
    assert torch.equal(out_cuda.cpu(), out_cpu)
    assert torch.equal(gx_cuda.cpu(), gx_cpu)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    "case",
    [
        swap_case(2, 5, 5),
        swap_case(4, 15, 15),
        up_case(10, 10, (15, 15), "bilinear"),
        d2_case(2, 15, 15, N=1),
        d2_case(5, 4, 3),
    ],
    ids=repr,
)
def test_cuda_forward_equals_reference_float64(case):
    x = rand(case.shape, torch.float64, seed=35)
    assert torch.equal(case.fused(x.cuda()).cpu(), case.reference(x))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    "case",
    [
        swap_case(2, 15, 15),
        swap_case(8, 5, 5),
        up_case(10, 10, (15, 15), "bilinear"),
        d2_case(2, 15, 15, N=1),
    ],
    ids=repr,
)
def test_cuda_backward_is_deterministic(case):
    x = rand(case.shape, torch.float32, seed=36, device="cuda")
    out = case.fused(x)
    grad_out = rand(out.shape, torch.float32, seed=37, device="cuda")
    first = _fwd_bwd(case.fused, x, grad_out)[1]
    second = _fwd_bwd(case.fused, x, grad_out)[1]
    assert torch.equal(first, second)


@pytest.mark.gpu
@requires_cuda
def test_cuda_non_contiguous_empty_and_large_index():
    x = rand((2, 5, 3, 9, 16), seed=38, device="cuda")[..., ::2]
    assert torch.equal(OPS.swap_align2nat(x, 3, -6.0).cpu(), OPS.swap_align2nat(x.cpu(), 3, -6.0))
    empty = torch.empty((0, 3, 3, 4, 4), device="cuda")
    assert OPS.swap_align2nat(empty, 2, -6.0).shape == (0, 6, 6, 2, 2)
    # More than 2^30 elements: the kernels switch to 64-bit indexing (about 4.3 GB in float16).
    if torch.cuda.get_device_properties(0).total_memory > 24 * 2**30:
        big = torch.ones((1, 4, 4, 8200, 8200), dtype=torch.float16, device="cuda")
        out = OPS.swap_align2nat(big, 2, -6.0)  # (1, 8, 8, 4100, 4100): 1.08e9 elements
        assert out.shape == (1, 8, 8, 4100, 4100)
        assert float(out[0, 7, 7, 4000, 4000]) == 1.0  # (Y, X) = (8003, 8003): inside
        assert float(out[0, 7, 7, 4099, 4099]) == -6.0  # (8201, 8201): outside
        del out
        out = OPS.swap_align2nat_detectron2(big, 2, -6.0)  # its weights are dyadic: exact sums
        assert float(out[0, 3, 3, 4000, 4000]) == 1.0  # rows 7999, 8000; v* 1, 2: inside
        assert float(out[0, 7, 7, 4099, 4099]) == -6.0  # rows 8201, 8202: every tap pad
        del big, out
        torch.cuda.empty_cache()


@pytest.mark.gpu
@requires_cuda
def test_cuda_compile_and_opcheck():
    x = rand((2, 3, 3, 5, 4), seed=39, device="cuda").requires_grad_(True)
    torch.library.opcheck(OPS.swap_align2nat, (x, 2, -6.0))
    torch.library.opcheck(OPS.up_align2nat, (x, 5, 4, "bilinear", -6.0))
    torch.library.opcheck(OPS.swap_align2nat_detectron2, (x, 2, -6.0))
    compiled = torch.compile(lambda t: OPS.swap_align2nat(t, 2, -6.0).sum(), backend="aot_eager")
    assert torch.equal(compiled(x), OPS.swap_align2nat(x, 2, -6.0).sum())

"""Backward kernels, autograd and operator registration (opcheck, torch.compile)."""

from __future__ import annotations

import pytest
import torch

from tensormask_ray.ops import api

from ._cases import OPS, d2_case, gradient_cases, rand, requires_ext, swap_case, up_case

pytestmark = requires_ext


def _grads(fn, x, grad_out_seed=11):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    grad_out = rand(out.shape, out.dtype, seed=grad_out_seed)
    (gx,) = torch.autograd.grad(out, x, grad_out)
    return gx


@pytest.mark.parametrize("case", gradient_cases(), ids=repr)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_gradients_match_reference(case, dtype):
    x = rand(case.shape, dtype, seed=12)
    fused = _grads(case.fused, x)
    expected = _grads(case.reference, x)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(fused, expected, **tol)


GRADCHECK = [
    ("swap_align2nat lam=1", (1, 3, 3, 4, 5), lambda x: OPS.swap_align2nat(x, 1, -6.0)),
    ("swap_align2nat lam=2", (2, 3, 3, 5, 4), lambda x: OPS.swap_align2nat(x, 2, -6.0)),
    ("swap_align2nat lam=3", (1, 3, 2, 7, 5), lambda x: OPS.swap_align2nat(x, 3, 0.5)),
    (
        "up_align2nat bilinear",
        (2, 3, 3, 4, 5),
        lambda x: OPS.up_align2nat(x, 5, 4, "bilinear", -6.0),
    ),
    (
        "up_align2nat 10->15",
        (1, 10, 10, 3, 3),
        lambda x: OPS.up_align2nat(x, 15, 15, "bilinear", -6.0),
    ),
    ("up_align2nat down", (1, 4, 5, 4, 4), lambda x: OPS.up_align2nat(x, 3, 2, "bilinear", -6.0)),
    ("up_align2nat nearest", (2, 3, 3, 4, 5), lambda x: OPS.up_align2nat(x, 7, 5, "nearest", -6.0)),
    ("align2nat alpha=1", (2, 3, 5, 4, 6), lambda x: OPS.align2nat(x, 1, -6.0)),
    ("align2nat alpha=2", (2, 3, 5, 4, 6), lambda x: OPS.align2nat(x, 2, 1.0)),
    ("nat2align alpha=2", (2, 5, 3, 6, 4), lambda x: OPS.nat2align(x, 2, -6.0)),
    (
        "swap_align2nat_detectron2 lam=1 even",
        (2, 4, 3, 4, 5),
        lambda x: OPS.swap_align2nat_detectron2(x, 1, -6.0),
    ),
    (
        "swap_align2nat_detectron2 lam=2",
        (2, 3, 2, 5, 4),
        lambda x: OPS.swap_align2nat_detectron2(x, 2, 0.5),
    ),
    (
        "swap_align2nat_detectron2 lam=3",
        (1, 3, 3, 7, 5),
        lambda x: OPS.swap_align2nat_detectron2(x, 3, -6.0),
    ),
]


@pytest.mark.parametrize(("name", "shape", "fn"), GRADCHECK, ids=[c[0] for c in GRADCHECK])
def test_gradcheck(name, shape, fn):
    x = rand(shape, torch.float64, seed=13).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize(
    "case",
    [
        swap_case(2, 5, 5),
        swap_case(3, 5, 3),
        swap_case(8, 3, 3),
        up_case(10, 10, (15, 15), "bilinear"),
        up_case(5, 3, (11, 7), "nearest"),
        d2_case(2, 5, 4),
        d2_case(3, 4, 3),
    ],
    ids=repr,
)
def test_backward_is_deterministic(case):
    """The same gradients, bit for bit, whether the CPU kernel runs on one thread or several: no
    accumulation order that depends on how the work is split (two calls on the same thread count
    would agree even for a kernel that is not)."""
    x = rand(case.shape, torch.float32, seed=14)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _grads(case.fused, x)
        torch.set_num_threads(4)
        several = _grads(case.fused, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, several)


def _opcheck_samples():
    x = rand((2, 3, 3, 5, 4), seed=15).requires_grad_(True)
    y = rand((2, 5, 3, 6, 7), seed=16, dtype=torch.float32).requires_grad_(True)
    return [
        ("align2nat", OPS.align2nat, (x, 2, -6.0)),
        ("nat2align", OPS.nat2align, (y, 1, 0.5)),
        ("up_align2nat bilinear", OPS.up_align2nat, (x, 5, 4, "bilinear", -6.0)),
        ("up_align2nat nearest", OPS.up_align2nat, (y, 7, 5, "nearest", -6.0)),
        ("swap_align2nat", OPS.swap_align2nat, (x, 2, -6.0)),
        ("swap_align2nat lam=3", OPS.swap_align2nat, (y, 3, 1.0)),
        ("align2nat_backward", OPS.align2nat_backward, (rand((2, 3, 3, 5, 4), seed=17), 2)),
        ("nat2align_backward", OPS.nat2align_backward, (rand((2, 5, 3, 6, 7), seed=18), 1)),
        (
            "up_align2nat_backward",
            OPS.up_align2nat_backward,
            (rand((2, 5, 4, 5, 4), seed=19), [2, 3, 3, 5, 4], "bilinear"),
        ),
        (
            "swap_align2nat_backward",
            OPS.swap_align2nat_backward,
            (rand((2, 6, 6, 3, 2), seed=20), [2, 3, 3, 5, 4], 2),
        ),
        ("swap_align2nat_detectron2", OPS.swap_align2nat_detectron2, (x, 2, -6.0)),
        ("swap_align2nat_detectron2 lam=3", OPS.swap_align2nat_detectron2, (y, 3, 1.0)),
        (
            "swap_align2nat_detectron2_backward",
            OPS.swap_align2nat_detectron2_backward,
            (rand((2, 6, 6, 3, 2), seed=23), [2, 3, 3, 5, 4], 2),
        ),
    ]


@pytest.mark.parametrize(
    ("name", "op", "args"), _opcheck_samples(), ids=[s[0] for s in _opcheck_samples()]
)
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def test_torch_compile_matches_eager():
    def model(x):
        swapped = OPS.swap_align2nat(x, 2, -6.0)  # (N, 2V, 2U, ceil(H/2), ceil(W/2))
        up = OPS.up_align2nat(x, 2 * x.shape[1], 2 * x.shape[2], "bilinear", -6.0)
        natural = OPS.align2nat(x, 1, -6.0)
        d2 = OPS.swap_align2nat_detectron2(x, 2, -6.0)
        return (
            swapped.sum()
            + (up.sin() * 0.5).sum()
            + OPS.nat2align(natural, 1, 0.0).square().sum()
            + d2.cos().sum()
        )

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = rand((2, 3, 5, 7, 6), seed=21).requires_grad_(True)
    eager_out = model(x)
    (eager_grad,) = torch.autograd.grad(eager_out, x)
    compiled_out = compiled(x)
    (compiled_grad,) = torch.autograd.grad(compiled_out, x)
    assert torch.equal(compiled_out, eager_out)
    assert torch.equal(compiled_grad, eager_grad)


@pytest.mark.parametrize("geometry", ["paper", "detectron2"])
def test_torch_compile_through_public_api(geometry):
    compiled = torch.compile(
        lambda t: api.swap_align2nat(t, 3, -6.0, geometry=geometry) * 2, backend="aot_eager"
    )
    x = rand((1, 3, 3, 8, 7), seed=22)
    assert torch.equal(compiled(x), api.swap_align2nat(x, 3, -6.0, geometry=geometry) * 2)

"""The sparse window decoder and the model's uses of the ops on CUDA (run by `make gpu-check`;
skipped without a GPU): decode_windows on CUDA equals its CPU result and the dense op at those
windows, for every mask head's op; swap_align2nat compiles with inductor on CUDA."""

from __future__ import annotations

import pytest
import torch

from tensormask_ray.modeling.window_op import WindowOp, decode_windows

from ._cases import rand, requires_cuda, requires_ext

pytestmark = [requires_ext, requires_cuda, pytest.mark.gpu]

OPS = [
    pytest.param(WindowOp((5, 5), natural=True), (2, 5, 5, 9, 11), id="natural"),
    pytest.param(WindowOp((5, 5), alpha=1), (2, 5, 5, 9, 11), id="align2nat"),
    pytest.param(WindowOp((5, 5), alpha=2), (2, 5, 5, 9, 11), id="align2nat-a2"),
    pytest.param(WindowOp((10, 10), alpha=1), (2, 5, 5, 9, 11), id="up_align2nat-bilinear"),
    pytest.param(
        WindowOp((10, 10), alpha=1, mode="nearest"), (2, 5, 5, 9, 11), id="up_align2nat-nearest"
    ),
    pytest.param(
        WindowOp((15, 15), natural=True, mode="bilinear"), (2, 5, 5, 9, 11), id="upscale-natural"
    ),
    pytest.param(WindowOp((30, 30), alpha=1, stride=2), (2, 15, 15, 9, 11), id="swap-lam2"),
    pytest.param(WindowOp((60, 60), alpha=1, stride=4), (1, 15, 15, 17, 13), id="swap-lam4"),
]


def _windows(op: WindowOp, shape, k: int = 7):
    N, _, _, H, W = shape
    Ho, Wo = -(-H // op.stride), -(-W // op.stride)
    g = torch.Generator().manual_seed(3)
    n = torch.randint(0, N, (k,), generator=g)
    ys = torch.cat([torch.tensor([0, Ho - 1]), torch.randint(0, Ho, (k - 2,), generator=g)])
    xs = torch.cat([torch.tensor([Wo - 1, 0]), torch.randint(0, Wo, (k - 2,), generator=g)])
    return n, ys, xs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("op", "shape"), OPS)
def test_sparse_decoder_on_cuda_equals_cpu_and_the_dense_op(op, shape, dtype):
    x = rand(shape, dtype, seed=41)
    n, ys, xs = _windows(op, shape)
    cpu = decode_windows(x, op, n, ys, xs, -6.0)
    xc, nc, ysc, xsc = x.cuda(), n.cuda(), ys.cuda(), xs.cuda()
    cuda = decode_windows(xc, op, nc, ysc, xsc, -6.0)
    assert cuda.is_cuda and cuda.shape == (len(n), *op.out_size)
    dense = op.dense(xc, -6.0)[nc, :, :, ysc, xsc]
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=tol, atol=tol)
    torch.testing.assert_close(cuda, dense, rtol=tol, atol=tol)


def test_sparse_decoder_on_a_crop_on_cuda():
    op, shape = WindowOp((30, 30), alpha=1, stride=2), (1, 15, 15, 12, 14)
    x = rand(shape, torch.float32, seed=42, device="cuda")
    n, ys, xs = (t.cuda() for t in _windows(op, shape, k=4))
    full = decode_windows(x, op, n, ys, xs, -6.0)
    crop = decode_windows(x[..., 2:, 3:], op, n, ys, xs, -6.0, origin=(2, 3), bounds=(12, 14))
    keep = (2 * ys.long()[:, None] + torch.arange(30, device="cuda") - 15 >= 2)[:, :, None] & (
        2 * xs.long()[:, None] + torch.arange(30, device="cuda") - 15 >= 3
    )[:, None, :]
    assert torch.equal(torch.where(keep, crop, full), full)


def test_swap_align2nat_compiles_with_inductor_on_cuda():
    x = rand((2, 5, 5, 12, 10), torch.float32, seed=43, device="cuda").requires_grad_(True)

    def f(t):
        return torch.ops.tensormask.swap_align2nat(t * 2.0, 2, -6.0).sigmoid().sum()

    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    expected = f(x)
    (g_expected,) = torch.autograd.grad(expected, x)
    got = compiled(x)
    (g_got,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(g_got, g_expected)

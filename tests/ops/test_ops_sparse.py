"""Sparse window decoding (modeling.window_op): decode_windows at K windows == the dense op at those
windows, also from a crop of the head tensor; WindowOp.footprints holds every position read."""

from __future__ import annotations

import pytest
import torch

from tensormask_ray.modeling.window_op import WindowOp, decode_windows
from tensormask_ray.ops import api

from ._cases import rand, requires_ext

pytestmark = requires_ext

# (op, (V, U) of the head tensor). Paper ops and Detectron2's swap_align2nat, odd and even grids.
OPS = [
    (WindowOp((10, 6), alpha=1, stride=2), (5, 3)),
    (WindowOp((12, 12), alpha=1, stride=4), (3, 3)),
    (WindowOp((5, 5), alpha=2), (5, 5)),
    (WindowOp((9, 9), alpha=1), (6, 6)),
    (WindowOp((5, 3), natural=True), (5, 3)),
    (WindowOp((4, 3), stride=1, geometry="detectron2"), (4, 3)),
    (WindowOp((5, 5), stride=1, geometry="detectron2"), (5, 5)),
    (WindowOp((10, 6), stride=2, geometry="detectron2"), (5, 3)),
    (WindowOp((9, 12), stride=3, geometry="detectron2"), (3, 4)),
    (WindowOp((16, 16), stride=8, geometry="detectron2"), (2, 2)),
]
IDS = [f"{op.geometry}-out{op.out_size}-a{op.alpha}-s{op.stride}" for op, _ in OPS]
N, H, W = 2, 19, 22


def _windows(op: WindowOp, seed: int):
    """Random windows plus the four corners of the output grid of both images: (b, ys, xs) (K,)."""
    Ho, Wo = -(-H // op.stride), -(-W // op.stride)
    g = torch.Generator().manual_seed(seed)
    k = 12
    b = torch.randint(0, N, (k,), generator=g)
    ys = torch.randint(0, Ho, (k,), generator=g)
    xs = torch.randint(0, Wo, (k,), generator=g)
    corners = torch.tensor([(n, y, x) for n in range(N) for y in (0, Ho - 1) for x in (0, Wo - 1)])
    return (
        torch.cat([b, corners[:, 0]]),
        torch.cat([ys, corners[:, 1]]),
        torch.cat([xs, corners[:, 2]]),
    )


def _tol(op: WindowOp) -> dict:
    # Detectron2's geometry: the same operations in the same order, bit for bit. The paper ops'
    # decoding adds ATen's bilinear taps without its fmas: float64 rounding apart.
    return {"rtol": 0, "atol": 0} if op.geometry == "detectron2" else {"rtol": 0, "atol": 1e-12}


@pytest.mark.parametrize(("op", "VU"), OPS, ids=IDS)
def test_decode_windows_equals_dense_at_those_windows(op, VU):
    x = rand((N, *VU, H, W), seed=1)
    b, ys, xs = _windows(op, seed=2)
    sparse = decode_windows(x, op, b, ys, xs, pad_value=-3.0)  # (K, Vo, Uo)
    dense = op.dense(x, -3.0)[b, :, :, ys, xs]
    assert sparse.shape == dense.shape == (b.numel(), *op.out_size)
    torch.testing.assert_close(sparse, dense, **_tol(op))


@pytest.mark.parametrize(("op", "VU"), OPS, ids=IDS)
def test_decode_from_the_footprint_crop_equals_decode_from_the_whole_tensor(op, VU):
    """Each window decoded from the crop [r0, r1) x [c0, c1) of its footprint (origin, bounds),
    every position outside the crop replaced by garbage, gives the full tensor's mask: the
    footprint holds every position read, and positions outside bounds read pad_value."""
    x = rand((N, *VU, H, W), seed=3)
    b, ys, xs = _windows(op, seed=4)
    full = decode_windows(x, op, b, ys, xs, pad_value=-6.0)
    foot = op.footprints(ys, xs, (H, W))  # (K, 4)
    assert foot.shape == (b.numel(), 4) and foot.dtype == torch.long
    for k, (r0, r1, c0, c1) in enumerate(foot.tolist()):
        assert 0 <= r0 < r1 <= H and 0 <= c0 < c1 <= W
        garbage = torch.full_like(x, 1e6)
        garbage[..., r0:r1, c0:c1] = x[..., r0:r1, c0:c1]
        crop = garbage[..., r0:r1, c0:c1]
        one = slice(k, k + 1)
        from_crop = decode_windows(
            crop, op, b[one], ys[one], xs[one], -6.0, origin=(r0, c0), bounds=(H, W)
        )
        assert torch.equal(from_crop, full[one])
        # the same with the garbage tensor itself: nothing outside the footprint is read
        assert torch.equal(decode_windows(garbage, op, b[one], ys[one], xs[one], -6.0), full[one])


@pytest.mark.parametrize(("op", "VU"), OPS, ids=IDS)
def test_footprints_are_tight(op, VU):
    """The first and last rows and columns of an unclipped footprint are read."""
    h, w = 40, 44
    x = rand((1, *VU, h, w), seed=5)
    ys, xs = torch.tensor([h // (2 * op.stride)]), torch.tensor([w // (2 * op.stride)])
    r0, r1, c0, c1 = op.footprints(ys, xs, (h, w))[0].tolist()
    assert 0 < r0 and r1 < h and 0 < c0 and c1 < w, "pick a window away from the border"
    base = decode_windows(x, op, torch.zeros(1), ys, xs, -6.0)
    for rows, cols in [
        (r0, slice(None)),
        (r1 - 1, slice(None)),
        (slice(None), c0),
        (slice(None), c1 - 1),
    ]:
        y = x.clone()
        y[..., rows, cols] += 1.0
        assert not torch.equal(decode_windows(y, op, torch.zeros(1), ys, xs, -6.0), base), (
            rows,
            cols,
        )


def test_footprints_clip_to_bounds():
    op = WindowOp((30, 30), alpha=1, stride=2)
    ys, xs = torch.tensor([0, 5, 9]), torch.tensor([10, 0, 3])
    foot = op.footprints(ys, xs, (20, 24))
    expected = [[0, 15, 5, 24], [0, 20, 0, 15], [3, 20, 0, 21]]
    assert foot.tolist() == expected
    # Detectron2: 30 + 1 rows (the half-pixel pairs), 9 columns (an odd grid)
    d2 = WindowOp((30, 9), stride=3, geometry="detectron2")
    foot = d2.footprints(torch.tensor([6, 4]), torch.tensor([4, 4]), (100, 100))
    assert foot.tolist() == [[3, 34, 8, 17], [0, 28, 8, 17]]


def test_window_op_geometry_is_validated():
    with pytest.raises(ValueError, match="geometry must be one of .* got 'd2'"):
        WindowOp((4, 4), geometry="d2")
    with pytest.raises(ValueError, match="geometry 'detectron2' is swap_align2nat"):
        WindowOp((4, 4), alpha=2, geometry="detectron2")
    op = WindowOp((6, 6), stride=2, geometry="detectron2")
    x = rand((1, 2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"out_size = stride \* \(V, U\) = \(4, 6\)"):
        op.dense(x, -6.0)
    with pytest.raises(ValueError, match=r"out_size = stride \* \(V, U\)"):
        decode_windows(x, op, torch.zeros(1), torch.zeros(1), torch.zeros(1), -6.0)


def test_dense_routes_the_detectron2_geometry_to_its_op():
    x = rand((2, 3, 3, 7, 6), seed=6)
    op = WindowOp((6, 6), stride=2, geometry="detectron2")
    assert torch.equal(op.dense(x, -1.0), api.swap_align2nat(x, 2, -1.0, geometry="detectron2"))

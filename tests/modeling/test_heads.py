"""Every mask head's outputs at every level and window size, and sparse == dense decoding."""

import pytest
import torch

from tensormask_ray.config import load_config
from tensormask_ray.modeling import build_model
from tensormask_ray.modeling.bipyramid import LazyBipyramidMasks

HEADS = [
    ("simple_natural", [9, 5], 1.0, "bilinear"),
    ("simple_aligned", [9, 5], 1.0, "bilinear"),
    ("upscale_natural", [9, 6], 3.0, "bilinear"),
    ("upscale_aligned", [9, 6], 3.0, "bilinear"),
    ("upscale_aligned", [9, 6], 1.5, "nearest"),
    ("bipyramid", [9, 5], 1.0, "bilinear"),
]


def small_model(head, sizes, lam, mode, **extra):
    overrides = {
        "model.mask_head": head,
        "model.window_sizes": sizes,
        "model.upscale_factor": lam,
        "model.upscale_mode": mode,
        "model.num_classes": 3,
        **extra,
    }
    cfg = load_config(preset="cpu-small", overrides=overrides)
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


@pytest.mark.parametrize("head, sizes, lam, mode", HEADS)
def test_head_output_shapes_at_every_level_and_window_size(head, sizes, lam, mode):
    model, cfg = small_model(head, sizes, lam, mode)
    N, H, W = 2, 128, 160
    cls, box, masks = model.head_outputs(torch.randn(N, 3, H, W))
    levels = range(cfg.model.min_level, cfg.model.max_level + 1)
    assert len(cls) == len(box) == len(masks) == len(levels)
    A, K = len(sizes), cfg.model.num_classes
    for k, level in enumerate(levels):
        h, w = -(-H // 2**level), -(-W // 2**level)
        assert cls[k].shape == (N, A * K, h, w)
        assert box[k].shape == (N, A * 4, h, w)
    for g in model.groups:
        natural = g.op.dense(masks[g.k][g.size_index], -6.0)
        h, w = cls[g.k].shape[-2:]
        if head == "bipyramid":
            # level k predicts 2^k V x 2^k U masks on its own (H/2^k, W/2^k) grid
            assert natural.shape == (N, 2**g.k * g.window_size, 2**g.k * g.window_size, h, w)
            assert g.cell == 2**cfg.model.min_level
        else:
            assert natural.shape == (N, g.window_size, g.window_size, h, w)
            assert g.cell == 2**g.level
        assert g.side == g.window_size * 2**g.level  # a window spans V strides of its level
        if head.startswith("upscale"):
            assert masks[g.k][g.size_index].shape[1] == round(g.window_size / lam)


@pytest.mark.parametrize("head, sizes, lam, mode", HEADS)
def test_sparse_decoding_equals_dense_decoding(head, sizes, lam, mode):
    """Inference decodes masks only at the windows that survive NMS; the masks must be the ones
    the dense output holds at those windows."""
    model, _ = small_model(head, sizes, lam, mode, **{"inference.score_thresh": 0.0})
    images = torch.randn(1, 3, 128, 160)
    cls, box, masks = model.head_outputs(images)
    _, _, lazy = model.head_outputs(images, lazy_masks=True)  # what inference uses
    assert isinstance(lazy, LazyBipyramidMasks) == (head == "bipyramid")
    cls_flat, box_flat, grids = model._flatten(cls, box)
    from tensormask_ray.modeling.postprocess import paste_masks, select_detections

    det = select_detections(
        model.groups, grids, cls_flat[0], box_flat[0], (128, 160), 0.0, 6000, 0.5, 100
    )
    assert det.group.numel() == 100 and det.group.unique().numel() > 1
    sparse = model.decode_masks(lazy, det.group, det.ys, det.xs, 0)
    dense = model.decode_masks(masks, det.group, det.ys, det.xs, 0, dense=True)
    for s, d in zip(sparse, dense):
        assert s.shape == d.shape
        torch.testing.assert_close(s, d, rtol=0, atol=1e-6)
    ps = paste_masks(sparse, det.windows, 128, 160)
    pd = paste_masks(dense, det.windows, 128, 160)
    assert torch.equal(ps, pd)


@pytest.mark.parametrize(
    "image, layout", [(0, "clustered"), (1, "clustered"), (0, "corners"), (1, "corners")]
)
def test_lazy_bipyramid_masks_equal_the_dense_head_at_any_windows(image, layout, monkeypatch):
    """Inference computes the bipyramid's fusion and conv+reshape only on crops around the decoded
    windows: per level one crop for clustered windows, one per window for spread ones, windows at
    the borders (reads outside the map) included. The masks are the dense head's."""
    model, _ = small_model("bipyramid", [9, 5], 1.0, "bilinear")
    images = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        cls, _, masks = model.head_outputs(images)
        _, _, lazy = model.head_outputs(images, lazy_masks=True)
    groups, ys, xs = [], [], []
    for gi, g in enumerate(model.groups):
        h, w = cls[g.k].shape[-2:]
        clustered = [
            (h // 2, w // 2),
            (h // 2, min(w // 2 + 1, w - 1)),
            (min(h // 2 + 1, h - 1), w // 2),
        ]
        corners = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)]
        for y, x in clustered if layout == "clustered" else corners:
            groups.append(gi)
            ys.append(y)
            xs.append(x)
    group, ys, xs = torch.tensor(groups), torch.tensor(ys), torch.tensor(xs)
    crops = []
    fused_crop = LazyBipyramidMasks.fused_crop
    monkeypatch.setattr(
        LazyBipyramidMasks, "fused_crop", lambda self, *a: crops.append(a) or fused_crop(self, *a)
    )
    with torch.no_grad():
        sparse = model.decode_masks(lazy, group, ys, xs, image)
        dense = model.decode_masks(masks, group, ys, xs, image, dense=True)
    for s, d in zip(sparse, dense):
        assert s.shape == d.shape
        torch.testing.assert_close(s, d, rtol=0, atol=1e-6)
    assert any((d > 0.01).any() and (d < 0.99).any() for d in dense)  # not a constant mask
    levels = len(lazy.mask_feats)
    # clustered: one crop per level, smaller than the map; corners: at the finest level (small
    # footprints far apart) one crop per corner, which both window sizes' windows there share
    H, W = lazy.size
    finest = [c for c in crops if c[0] == 0]
    if layout == "clustered":
        assert len(crops) == levels and all(
            (r1 - r0) * (c1 - c0) < H * W for _, _, (r0, r1), (c0, c1) in finest
        )
    else:
        assert (
            len(finest) == 4 and int((group < 2).sum()) == 8
        )  # groups 0 and 1: level 0's two window sizes


def test_inference_returns_coco_style_instances_at_output_size():
    model, _ = small_model("bipyramid", [9], 1.0, "bilinear", **{"inference.score_thresh": 0.0})
    out = model(
        torch.randn(2, 3, 128, 160),
        image_sizes=[(128, 150), (100, 160)],
        output_sizes=[(256, 300), (50, 80)],
    )
    assert len(out) == 2
    for o, (oh, ow) in zip(out, [(256, 300), (50, 80)]):
        D = o["scores"].shape[0]
        assert 0 < D <= 100
        assert (
            o["boxes"].shape == (D, 4)
            and o["labels"].shape == (D,)
            and o["masks"].shape == (D, oh, ow)
        )
        assert o["masks"].dtype == torch.bool
        assert (
            (o["boxes"][:, 0::2] <= ow).all()
            and (o["boxes"][:, 1::2] <= oh).all()
            and (o["boxes"] >= 0).all()
        )
        assert o["labels"].min() >= 0 and o["labels"].max() < 3
        assert (o["scores"][:-1] >= o["scores"][1:]).all()


def test_training_gives_finite_losses_and_gradients_everywhere():
    model, _ = small_model("bipyramid", [9, 5], 1.0, "bilinear")
    model.train()
    masks = torch.zeros(2, 128, 160, dtype=torch.uint8)
    masks[0, 20:80, 30:110] = 1
    masks[1, 90:100, 10:22] = 1
    t = {"boxes": torch.tensor([[30.0, 20, 110, 80], [10, 90, 22, 100]]), "labels": torch.tensor([0, 2]),
         "masks": masks, "iscrowd": torch.zeros(2, dtype=torch.bool)}  # fmt: skip
    losses = model(torch.randn(2, 3, 128, 160), [t, t])
    assert set(losses) == {"loss_cls", "loss_box", "loss_mask"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # DDP needs every trainable parameter in the graph

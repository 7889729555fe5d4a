"""Every mask head's outputs at every level and window size, and sparse == dense decoding."""

import pytest
import torch

from tensormask_ray.config import load_config
from tensormask_ray.modeling import build_model

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
            assert g.cell == 2 ** cfg.model.min_level
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
    cls_flat, box_flat, grids = model._flatten(cls, box)
    from tensormask_ray.modeling.postprocess import paste_masks, select_detections

    det = select_detections(model.groups, grids, cls_flat[0], box_flat[0], (128, 160), 0.0, 6000, 0.5, 100)
    assert det.group.numel() == 100 and det.group.unique().numel() > 1
    sparse = model.decode_masks(masks, det.group, det.ys, det.xs, 0)
    dense = model.decode_masks(masks, det.group, det.ys, det.xs, 0, dense=True)
    for s, d in zip(sparse, dense):
        assert s.shape == d.shape
        torch.testing.assert_close(s, d, rtol=0, atol=1e-6)
    ps = paste_masks(sparse, det.windows, 128, 160)
    pd = paste_masks(dense, det.windows, 128, 160)
    assert torch.equal(ps, pd)


def test_inference_returns_coco_style_instances_at_output_size():
    model, _ = small_model("bipyramid", [9], 1.0, "bilinear", **{"inference.score_thresh": 0.0})
    out = model(torch.randn(2, 3, 128, 160), image_sizes=[(128, 150), (100, 160)], output_sizes=[(256, 300), (50, 80)])
    assert len(out) == 2
    for o, (oh, ow) in zip(out, [(256, 300), (50, 80)]):
        D = o["scores"].shape[0]
        assert 0 < D <= 100
        assert o["boxes"].shape == (D, 4) and o["labels"].shape == (D,) and o["masks"].shape == (D, oh, ow)
        assert o["masks"].dtype == torch.bool
        assert (o["boxes"][:, 0::2] <= ow).all() and (o["boxes"][:, 1::2] <= oh).all() and (o["boxes"] >= 0).all()
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

"""Sparse training (model.mask_training="sparse": the mask head and window ops only on crops around
the positive windows) gives the dense path's losses and gradients."""

import pytest
import torch

from tensormask_ray.config import load_config
from tensormask_ray.modeling import build_model
from tensormask_ray.modeling.bipyramid import BipyramidFusion
from tensormask_ray.modeling.lazy import plan_crops

CASES = [  # mask head, window sizes, upscale factor, geometry
    ("bipyramid", [9, 5], 1.0, "paper"),
    ("bipyramid", [9], 1.0, "detectron2"),
    ("simple_aligned", [9, 5], 1.0, "detectron2"),
    ("upscale_aligned", [9], 3.0, "paper"),
]
H, W = 96, 128


def small_model(head, sizes, lam, geometry):
    overrides = {
        "model.mask_head": head,
        "model.window_sizes": sizes,
        "model.upscale_factor": lam,
        "model.geometry": geometry,
        "model.num_classes": 3,
        "model.fpn_channels": 8,
        "model.cls_channels": 8,
        "model.box_channels": 8,
        "model.mask_channels": 8,
        "model.tower_depth": 1,
    }
    cfg = load_config(preset="cpu-small", overrides=overrides)
    torch.manual_seed(0)
    model = build_model(cfg).double().train()
    for p in model.head.parameters():  # weights large enough for masks that are not constant
        torch.nn.init.normal_(p, std=0.3)
    return model


def batch():
    """Two images; objects of every size, one at a corner (windows reading outside the map)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)
    targets = []
    for boxes in (
        [(4, 6, 30, 40), (40, 20, 124, 92), (100, 70, 112, 84)],
        [(0, 0, 20, 16), (30, 10, 90, 60)],
    ):
        masks = torch.zeros(len(boxes), H, W, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes):
            m[y0 + 1 : y1 - 1, x0 + 2 : x1 - 1] = 1  # masks a little inside their boxes
        targets.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.arange(len(boxes)) % 3,
            "masks": masks, "iscrowd": torch.zeros(len(boxes), dtype=torch.bool),
        })  # fmt: skip
    return images, targets


def losses_and_grads(model, mask_training, images, targets):
    model.mask_training = mask_training
    model.zero_grad(set_to_none=True)
    losses = model(images, targets)
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}, {
        n: p.grad for n, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("head, sizes, lam, geometry", CASES)
def test_sparse_mask_training_equals_dense_in_losses_and_every_gradient(
    head, sizes, lam, geometry, monkeypatch
):
    model = small_model(head, sizes, lam, geometry)
    images, targets = batch()
    dense_losses, dense_grads = losses_and_grads(model, "dense", images, targets)
    # the sparse path never computes a level's full fused map
    monkeypatch.setattr(
        BipyramidFusion,
        "forward",
        lambda *a: pytest.fail("dense bipyramid fusion in sparse training"),
    )
    sparse_losses, sparse_grads = losses_and_grads(model, "sparse", images, targets)

    assert dense_losses["loss_mask"] > 0.1  # positives with masks that are not trivial
    for k in dense_losses:
        torch.testing.assert_close(sparse_losses[k], dense_losses[k], rtol=1e-12, atol=0)
    assert sparse_grads.keys() == dense_grads.keys()
    for name, g in dense_grads.items():
        assert sparse_grads[name] is not None, name  # DDP: every parameter in the graph
        torch.testing.assert_close(
            sparse_grads[name], g, rtol=1e-9, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}"
        )
    mask_grads = [g for n, g in dense_grads.items() if "mask_pred" in n or "bipyramid" in n]
    assert mask_grads and all(g.abs().sum() > 0 for g in mask_grads)  # the mask loss reaches them


def test_a_batch_without_positives_gives_zero_mask_loss_and_zero_mask_gradients():
    model = small_model("bipyramid", [9], 1.0, "paper")
    images, targets = batch()
    empty = [{**t, "boxes": t["boxes"][:0], "labels": t["labels"][:0], "masks": t["masks"][:0], "iscrowd": t["iscrowd"][:0]}
             for t in targets]  # fmt: skip
    losses, grads = losses_and_grads(model, "sparse", images, empty)
    assert losses["loss_mask"] == 0
    assert all(
        grads[n] is not None and not grads[n].any()
        for n in grads
        if "mask_pred" in n or "bipyramid" in n
    )


def test_crops_merge_overlapping_footprints_and_keep_distant_ones_apart():
    foot = torch.tensor(
        [[10, 25, 10, 25], [11, 26, 10, 25], [10, 25, 12, 27], [60, 75, 90, 105], [10, 25, 10, 25]]
    )
    crops = plan_crops(foot, (100, 120), halo=1)
    assert sorted((tuple(m.tolist()), box) for m, box in crops) == [
        ((0, 1, 2, 4), (10, 26, 10, 27)),  # one object's windows share a crop (the duplicate too)
        ((3,), (60, 75, 90, 105)),
    ]
    diagonal = plan_crops(torch.tensor([[0, 50, 0, 60], [50, 100, 60, 120]]), (100, 120), halo=0)
    assert len(diagonal) == 2  # their bounding box is the whole map: twice their area

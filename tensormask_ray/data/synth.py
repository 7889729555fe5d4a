"""`data synth`: a synthetic COCO instance-segmentation set anyone can make, deterministic under
a seed.

Each image has a textured, noisy background and overlapping shapes of four classes with
non-contiguous COCO-like ids (to catch id-mapping bugs): disks (1), rectangles (3, rotated),
triangles (7) and rings (12, with a hole). Sizes run log-uniformly from a few pixels to most of
the image, so every pyramid level gets positives. Shapes occlude each other; a shape is kept
only if every shape under it stays at least half visible, and each annotation is the *visible*
part. Unoccluded polygon shapes are annotated with their polygon (rasterised by pycocotools,
so the pixels drawn are exactly what `annToMask` returns), the rest with compressed RLE. Every
fifth image has a crowd region (a cluster of tiny disks, iscrowd=1, uncompressed RLE as in
COCO) and every tenth image has no object. JPEG and PNG files both occur; sizes and aspect
ratios vary. Image k is a function of (seed, k) alone, so a larger set extends a smaller one.

Two styles (`SynthStyle`): "cluttered" (the default, everything above) and "simple": a smooth
background without stripes and little noise, 1-4 shapes of at least 16 px, no crowds and no empty
images. The simple style is for comparisons that must learn from random weights in minutes on a
CPU (docs/ablations.md): it keeps what the mask heads are compared on (shape outlines at every
scale, occlusion) and drops what only slows detection down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from .coco_io import CocoFiles

CATEGORIES = [
    {"id": 1, "name": "disk", "supercategory": "shape"},
    {"id": 3, "name": "rectangle", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
    {"id": 12, "name": "ring", "supercategory": "shape"},
]
MIN_OBJECT_SIZE = 6.0  # pixels: the smallest shape's diameter / side
MIN_VISIBLE_FRACTION = 0.5
MIN_VISIBLE_PIXELS = 12


@dataclass(frozen=True)
class SynthStyle:
    """What a synthetic image may contain."""

    stripes: bool = True  # soft stripes over the background's colour field
    noise_std: float = 10.0  # background pixel noise
    objects: tuple[int, int] = (2, 8)  # shapes wanted per image, [low, high]
    min_object_size: float = MIN_OBJECT_SIZE  # pixels: the smallest diameter / side
    crowds: bool = True  # every fifth image has a crowd region
    empty_images: bool = True  # every tenth image has no object
    max_object_fraction: float = 0.9  # the largest diameter / side, of the image's shorter side
    whole_shapes: bool = False  # shapes lie inside the image (else they may be cut by its edge)
    # one colour with a gentle gradient (else a blotchy colour field)
    plain_background: bool = False


STYLES: dict[str, SynthStyle] = {
    "cluttered": SynthStyle(),
    "simple": SynthStyle(
        stripes=False,
        noise_std=3.0,
        objects=(1, 4),
        min_object_size=16.0,
        crowds=False,
        empty_images=False,
    ),
    # The demo's: several whole, mid-sized shapes on a plain background, the easiest to learn from
    # random weights in a few CPU minutes and still all four classes, occlusion and every level.
    "plain": SynthStyle(
        stripes=False,
        noise_std=3.0,
        objects=(3, 6),
        min_object_size=20.0,
        crowds=False,
        empty_images=False,
        max_object_fraction=0.45,
        whole_shapes=True,
        plain_background=True,
    ),
}


def _background(rng: np.random.Generator, h: int, w: int, style: SynthStyle) -> np.ndarray:
    """Smooth colour field (+ a few soft stripes) + pixel noise, float32 (H, W, 3) in [0, 255]."""
    if style.plain_background:
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        slope = rng.uniform(-12, 12, size=(2, 3)).astype(
            np.float32
        )  # colour change across the image
        field = (
            rng.uniform(70, 190, size=3).astype(np.float32)
            + (yy / h - 0.5)[..., None] * slope[0]
            + (xx / w - 0.5)[..., None] * slope[1]
        )
        return field + rng.normal(0, style.noise_std, size=field.shape)
    coarse = rng.uniform(40, 215, size=(rng.integers(3, 9), rng.integers(3, 9), 3)).astype(np.uint8)
    field = np.asarray(
        Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32
    )
    if style.stripes:
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        for _ in range(rng.integers(1, 4)):
            angle, period = rng.uniform(0, math.pi), rng.uniform(6, 40)
            phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period)
            field += rng.uniform(5, 25) * np.sin(phase)[..., None] * rng.uniform(-1, 1, size=3)
    field += rng.normal(0, style.noise_std, size=field.shape)
    return field


def _polygon_mask(poly: list[float], h: int, w: int) -> np.ndarray:
    """The polygon rasterised as pycocotools does (so `annToMask` of the annotation gives these
    pixels). Where pycocotools is missing (the GPU check's machine, which only trains on the
    images in memory), PIL's fill, which differs at a few edge pixels."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        canvas = Image.new("1", (w, h))
        ImageDraw.Draw(canvas).polygon(poly, fill=1)
        return np.asarray(canvas, dtype=bool)
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
    return mask_utils.decode(rle).astype(bool)


def _shape(
    rng: np.random.Generator, h: int, w: int, min_size: float, max_size: float, whole: bool = False
):
    """One random shape -> (category id, full mask, polygon or None). whole: inside the image."""
    size = math.exp(rng.uniform(math.log(min_size), math.log(max_size)))
    if (
        whole
    ):  # the centre at least the circumscribed radius (a square's half-diagonal) from the edges
        r = min(size / 2 * math.sqrt(2), w / 2, h / 2)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    else:
        cx, cy = rng.uniform(-0.1 * w, 1.1 * w), rng.uniform(-0.1 * h, 1.1 * h)
    kind = int(rng.integers(len(CATEGORIES)))
    category_id = CATEGORIES[kind]["id"]
    if category_id == 12:  # ring: analytic, has a hole, RLE only
        yy, xx = np.mgrid[:h, :w]
        d2 = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2
        r = size / 2
        inner = r * rng.uniform(0.35, 0.65)
        return category_id, (d2 <= r * r) & (d2 >= inner * inner), None
    if category_id == 1:  # disk (a many-sided polygon, slightly elliptic)
        n = int(np.clip(size, 8, 48))
        t = np.arange(n) * (2 * math.pi / n)
        rx, ry = size / 2, size / 2 * rng.uniform(0.8, 1.0)
        pts = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)
    elif category_id == 3:  # rotated rectangle
        a = rng.uniform(0, math.pi)
        sx, sy = size / 2, size / 2 * rng.uniform(0.3, 1.0)
        corners = np.array([[-sx, -sy], [sx, -sy], [sx, sy], [-sx, sy]])
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        pts = corners @ rot.T + [cx, cy]
    else:  # triangle, not too thin
        t = rng.uniform(0, 2 * math.pi) + np.array([0, 2.1, 4.2]) + rng.uniform(-0.4, 0.4, 3)
        pts = np.stack([cx + size / 2 * np.cos(t), cy + size / 2 * np.sin(t)], axis=1)
    poly = [round(float(v), 2) for v in pts.reshape(-1)]
    return category_id, _polygon_mask(poly, h, w), poly


def _paint(canvas: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    colour = rng.uniform(0, 255, size=3)
    texture = rng.normal(0, rng.uniform(2, 18), size=(int(mask.sum()), 3))
    canvas[mask] = colour + texture


def synth_image(
    index: int, image_size: int = 256, seed: int = 0, style: str = "cluttered"
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Image `index` of the set: (RGB uint8 (H, W, 3), instances), each instance a dict with
    category_id, mask (visible part, bool (H, W)), polygon (or None: annotate as RLE), iscrowd."""
    st = synth_style(style)
    rng = np.random.default_rng([seed, index])
    long_side = image_size
    short_side = int(round(image_size * rng.uniform(0.6, 1.0)))
    h, w = (short_side, long_side) if rng.random() < 0.6 else (long_side, short_side)
    canvas = _background(rng, h, w, st)
    instances: list[dict[str, Any]] = []  # in painting order (later on top)

    if st.crowds and index % 5 == 2:  # a crowd: a cluster of tiny disks, annotated as one region
        cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
        spread = rng.uniform(0.06, 0.15) * min(h, w)
        yy, xx = np.mgrid[:h, :w]
        crowd = np.zeros((h, w), dtype=bool)
        for _ in range(rng.integers(6, 16)):
            px, py = rng.normal(cx, spread), rng.normal(cy, spread)
            crowd |= (xx + 0.5 - px) ** 2 + (yy + 0.5 - py) ** 2 <= rng.uniform(1.5, 3.5) ** 2
        if crowd.sum() >= MIN_VISIBLE_PIXELS:
            _paint(canvas, crowd, rng)
            instances.append(
                {
                    "category_id": 1,
                    "mask": crowd,
                    "full": crowd.copy(),
                    "polygon": None,
                    "iscrowd": 1,
                }
            )

    if not (st.empty_images and index % 10 == 9):  # every tenth image has no object
        wanted, attempts = int(rng.integers(st.objects[0], st.objects[1] + 1)), 0
        placed = 0
        while placed < wanted and attempts < 40:
            attempts += 1
            category_id, full, poly = _shape(
                rng, h, w, st.min_object_size, st.max_object_fraction * min(h, w), st.whole_shapes
            )
            if full.sum() < MIN_VISIBLE_PIXELS:
                continue
            ok = all(
                inst["iscrowd"]
                or (
                    (v := (inst["mask"] & ~full).sum()) >= MIN_VISIBLE_PIXELS
                    and v >= MIN_VISIBLE_FRACTION * inst["full"].sum()
                )
                for inst in instances
            )
            if not ok:
                continue
            for inst in instances:
                inst["mask"] &= ~full
            _paint(canvas, full, rng)
            inside = poly is not None and all(
                0 <= x <= w and 0 <= y <= h for x, y in zip(poly[0::2], poly[1::2])
            )
            instances.append(
                {
                    "category_id": category_id,
                    "mask": full.copy(),
                    "full": full,
                    "polygon": poly if inside else None,
                    "iscrowd": 0,
                }
            )
            placed += 1

    for inst in instances:  # polygons only for shapes nothing was painted over
        if inst["polygon"] is not None and not np.array_equal(inst["mask"], inst["full"]):
            inst["polygon"] = None
        del inst["full"]
    instances = [i for i in instances if i["mask"].sum() > 0]
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, instances


def synth_style(name: str) -> SynthStyle:
    if name not in STYLES:
        raise ValueError(f"unknown synthetic style {name!r}; known: {sorted(STYLES)}")
    return STYLES[name]


def make_synthetic_coco(
    out_dir: str | Path,
    num_images: int,
    image_size: int = 256,
    seed: int = 0,
    style: str = "cluttered",
) -> CocoFiles:
    """Writes `num_images` synthetic images to OUT/images and their annotations to
    OUT/instances.json. Image ids are 1..N; about 60% of unoccluded polygon shapes keep their
    polygon (the choice is seeded too)."""
    from .coco_io import (  # pycocotools: writing the set needs it, drawing images does not
        IMAGES_DIR,
        CocoFiles,
        annotation,
        encode_rle,
        save_image,
        uncompressed_rle,
        write_coco_json,
    )

    synth_style(style)  # fail before writing anything
    if num_images < 1:
        raise ValueError("num_images must be >= 1")
    if image_size < 32:
        raise ValueError("image_size must be >= 32")
    out_dir = Path(out_dir)
    images_dir = out_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image_id = index + 1
        rgb, instances = synth_image(index, image_size, seed, style)
        file_name = f"{image_id:012d}.{'png' if index % 4 == 3 else 'jpg'}"
        save_image(images_dir / file_name, rgb)
        h, w = rgb.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        fmt_rng = np.random.default_rng([seed, index, 1])
        for inst in instances:
            if inst["iscrowd"]:
                seg = uncompressed_rle(inst["mask"])
            elif inst["polygon"] is not None and fmt_rng.random() < 0.6:
                seg = [inst["polygon"]]
            else:
                seg = encode_rle(inst["mask"])
            ann_id = len(annotations) + 1
            annotations.append(
                annotation(
                    ann_id, image_id, inst["category_id"], inst["mask"], seg, inst["iscrowd"]
                )
            )
    dataset = {
        "info": {
            "description": f"tensormask-ray synthetic shapes (seed {seed}, size {image_size}, style {style})"
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }
    return CocoFiles(write_coco_json(out_dir, dataset), images_dir)

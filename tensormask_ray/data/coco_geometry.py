"""An annotation's geometry checked against its image: a COCO segmentation (polygons,
uncompressed or compressed RLE) -> compressed RLE (`segmentation_to_rle`), a box inside the
image (`box_problem`). Each answers what is wrong instead of raising."""

from __future__ import annotations

from typing import Any

from pycocotools import mask as mask_utils

from ..finite import is_finite_number, is_int

# A box may pass the image border by this many pixels (rounding in real annotations).
BOX_TOLERANCE = 1.0


def _rle_string_counts(s: str) -> list[int]:
    """Decodes COCO's compressed RLE string (pycocotools' rleFrString) into run lengths, so a
    malformed string is caught here instead of corrupting memory in the C decoder."""
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("the counts string ends inside a number")
            c = ord(s[p]) - 48
            if c < 0 or c > 63:
                raise ValueError(f"character {s[p]!r} is not valid in compressed RLE")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def segmentation_to_rle(
    seg: Any, height: int, width: int
) -> tuple[dict[str, Any] | None, str | None]:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) of an image of the given
    size -> (compressed RLE with str counts, None) or (None, what is wrong with it)."""
    if isinstance(seg, list):
        if not seg:
            return None, "empty polygon (no rings)"
        for k, ring in enumerate(seg):
            if not isinstance(ring, list) or not all(is_finite_number(v) for v in ring):
                return None, f"degenerate polygon: ring {k} is not a list of finite numbers"
            if len(ring) < 6 or len(ring) % 2:
                return None, (
                    f"degenerate polygon: ring {k} has {len(ring)} coordinates "
                    "(a polygon needs an even number, at least 6: three points)"
                )
        rle = mask_utils.merge(
            mask_utils.frPyObjects([[float(v) for v in r] for r in seg], height, width)
        )
        if mask_utils.area(rle) == 0:
            return None, "degenerate polygon: it covers no pixel"
    elif isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size)):
            return None, f"RLE 'size' is {size!r}, expected [height, width]"
        if list(size) != [height, width]:
            return None, f"RLE size {size} differs from the image's [{height}, {width}]"
        if isinstance(counts, list):
            if not all(is_int(v) and v >= 0 for v in counts):
                return None, "uncompressed RLE 'counts' must be non-negative integers"
            total = sum(counts)
            if total != height * width:
                return (
                    None,
                    f"uncompressed RLE counts sum to {total}, expected {height}x{width} = {height * width}",
                )
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        elif isinstance(counts, str):
            try:
                runs = _rle_string_counts(counts)
            except ValueError as e:
                return None, f"malformed compressed RLE: {e}"
            if any(v < 0 for v in runs) or sum(runs) != height * width:
                return (
                    None,
                    f"malformed compressed RLE: runs sum to {sum(runs)}, expected {height * width}",
                )
            rle = {"size": [height, width], "counts": counts.encode("ascii")}
        else:
            return None, "RLE 'counts' is neither a list nor a string"
        if mask_utils.area(rle) == 0:
            return None, "empty mask: the RLE covers no pixel"
    elif seg is None:
        return None, "no 'segmentation'"
    else:
        return None, f"'segmentation' is a {type(seg).__name__}, neither polygons nor RLE"
    counts = rle["counts"]
    return {
        "size": [height, width],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }, None


def box_problem(bbox: Any, height: int, width: int) -> str | None:
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_finite_number(v) for v in bbox)):
        return f"'bbox' is {bbox!r:.80}, expected [x, y, width, height]"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"degenerate box {bbox} (width and height must be > 0)"
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"box {bbox} [x, y, w, h] lies outside the {width}x{height} image"
    return None


__all__ = ["BOX_TOLERANCE", "box_problem", "segmentation_to_rle"]

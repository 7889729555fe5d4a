"""An image file read whole, as `data prepare` stores it: its bytes, format and size, or what
is wrong with it (missing, truncated, corrupt)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image


def read_image_file(path: Path) -> tuple[bytes, str, int, int]:
    """(bytes as stored, format, height, width); raises OSError / ValueError for a missing,
    truncated or corrupt file. Decodes the whole image: a truncated JPEG fails only then."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        fmt = (im.format or "").lower()
        im.load()
        width, height = im.size
    return data, fmt, height, width


def image_file_problem(path: Path) -> tuple[tuple[bytes, str, int, int] | None, str | None]:
    if not path.is_file():
        return None, f"image file not found: {path}"
    try:
        return read_image_file(path), None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return (
            None,
            f"cannot decode the image file {path} (truncated or corrupt: {type(e).__name__}: {e})",
        )


__all__ = ["image_file_problem", "read_image_file"]

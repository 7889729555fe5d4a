"""What counts as a number in the files and metrics we read: a finite int, float or NumPy real
scalar, never a bool (which Python counts as an int) and never NaN or infinity."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_finite_number(x: Any) -> bool:
    """True for a finite int, float or NumPy integer/floating scalar; False for a bool, NaN,
    an infinity, a string, None or anything else."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(x)


def is_int(x: Any) -> bool:
    """True for a Python int that is not a bool (an id, a count, a size read from JSON)."""
    return isinstance(x, int) and not isinstance(x, bool)


def finite_or_none(x: Any) -> float | None:
    """`float(x)` for a finite number (see `is_finite_number`), else None."""
    return float(x) if is_finite_number(x) else None


__all__ = ["finite_or_none", "is_finite_number", "is_int"]

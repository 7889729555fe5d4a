"""finite.py: the one definition of "a number" for records, specs and metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tensormask_ray.finite import finite_or_none, is_finite_number


@pytest.mark.parametrize("x", [0, -3, 2.5, np.float32(1.5), np.float64(-2.0), np.int64(7)])
def test_finite_numbers_are_numbers(x):
    assert is_finite_number(x)
    assert finite_or_none(x) == float(x) and type(finite_or_none(x)) is float


@pytest.mark.parametrize(
    "x",
    [
        True,
        False,
        np.bool_(True),
        math.nan,
        math.inf,
        -math.inf,
        np.float32("nan"),
        "1",
        None,
        [1],
        1j,
    ],
)
def test_bools_non_finite_and_non_numbers_are_not(x):
    assert not is_finite_number(x)
    assert finite_or_none(x) is None

"""Fixtures of the evaluation tests: the small ground truth of `synthetic.py`."""

from __future__ import annotations

import pytest

from .synthetic import coco_from_dataset, make_dataset


@pytest.fixture
def dataset():
    return make_dataset()


@pytest.fixture
def coco_gt(dataset):
    return coco_from_dataset(dataset[0])

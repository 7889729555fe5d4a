"""Training batches without Ray: the samples and batches of the Ray Data pipeline (dataset.py),
made in this process, for single-process runs of the training loop (`train.context.LocalContext`:
the GPU check, device tests, debugging a model by hand).

    synthetic_batches(cfg, ...)(epoch)   synthetic shapes (data/synth.py) drawn in memory; needs
                                         only numpy, PIL and torch (no pycocotools, no files)
    shard_batches(shards_dir, cfg)(epoch) the images of a shards folder (`data prepare`)

Each sample is augmented exactly as in the Ray pipeline (`transforms.augment_sample`, seeded by
(seed, epoch, image id)); rank r of `world_size` takes images r, r + world_size, ... of an order
shuffled per epoch, and batches are `transforms.collate_train`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from . import transforms
from .manifest import CategoryMap

Batches = Callable[[int], Iterator[dict[str, Any]]]  # epoch -> that epoch's batches


def batches_of(
    samples: Iterable[dict[str, Any]], batch_size: int, size_divisibility: int
) -> Iterator[dict[str, Any]]:
    """Groups samples into `collate_train` batches of `batch_size` (a last, smaller one is dropped,
    as Ray Train's iterator does with drop_last)."""
    group: list[dict[str, Any]] = []
    for sample in samples:
        group.append(sample)
        if len(group) == batch_size:
            yield transforms.collate_train(group, size_divisibility)
            group = []


def epoch_order(
    num_images: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[int]:
    """Indices [0, num_images) in an order drawn from (seed, epoch), this rank's share only."""
    order = np.random.default_rng([seed, epoch, 11]).permutation(num_images)
    return [int(i) for i in order[rank::world_size]]


def synthetic_batches(
    cfg: Config,
    num_images: int,
    image_size: int = 224,
    seed: int = 0,
    style: str = "simple",
    rank: int = 0,
    world_size: int = 1,
) -> Batches:
    """epoch -> batches of `cfg.data.batch_size_per_worker` synthetic images (image ids 1..N as
    in `data synth`; class indices from the CategoryMap of synth.CATEGORIES, as in their
    manifest). The drawn images are kept in memory, so later epochs only augment.
    `cfg.model.num_classes` must be 4."""
    from .synth import CATEGORIES, synth_image

    if cfg.model.num_classes != len(CATEGORIES):
        raise ValueError(
            f"synthetic_batches: the synthetic shapes have {len(CATEGORIES)} classes, config key 'model.num_classes' is {cfg.model.num_classes}"
        )
    categories = CategoryMap.from_categories(CATEGORIES)
    drawn: dict[int, tuple] = {}

    def decoded(index: int) -> tuple:
        if index not in drawn:
            image, instances = synth_image(index, image_size, seed, style)
            masks = (
                np.stack([i["mask"] for i in instances]).astype(np.uint8)
                if instances
                else np.zeros((0, *image.shape[:2]), np.uint8)
            )
            boxes, _ = transforms.masks_to_boxes(masks)
            labels = np.array(
                categories.indices([i["category_id"] for i in instances]), dtype=np.int64
            )
            iscrowd = np.array([bool(i["iscrowd"]) for i in instances], dtype=bool)
            drawn[index] = (image, masks, boxes, labels, iscrowd)
        return drawn[index]

    def samples(epoch: int) -> Iterator[dict[str, Any]]:
        for index in epoch_order(num_images, cfg.data.seed, epoch, rank, world_size):
            image, masks, boxes, labels, iscrowd = decoded(index)
            yield transforms.augment_sample(
                index + 1,
                image,
                masks,
                boxes.copy(),
                labels,
                iscrowd,
                cfg.input,
                cfg.data.seed,
                epoch,
            )

    return lambda epoch: batches_of(
        samples(epoch), cfg.data.batch_size_per_worker, cfg.input.size_divisibility
    )


def shard_batches(
    shards_dir: str | Path, cfg: Config, rank: int = 0, world_size: int = 1
) -> Batches:
    """epoch -> batches of the images of a shards folder (decoding masks needs pycocotools)."""
    import pyarrow.parquet as pq

    from .manifest import CategoryMap, read_manifest, shard_paths
    from .schema import TRAIN_COLUMNS

    manifest = read_manifest(shards_dir)
    categories = CategoryMap.from_manifest(manifest)
    rows = [
        row
        for path in shard_paths(shards_dir, manifest)
        for row in pq.read_table(path, columns=TRAIN_COLUMNS).to_pylist()
    ]

    def samples(epoch: int) -> Iterator[dict[str, Any]]:
        for index in epoch_order(len(rows), cfg.data.seed, epoch, rank, world_size):
            yield transforms.train_sample(rows[index], categories, cfg.input, cfg.data.seed, epoch)

    return lambda epoch: batches_of(
        samples(epoch), cfg.data.batch_size_per_worker, cfg.input.size_divisibility
    )


__all__ = ["Batches", "batches_of", "epoch_order", "shard_batches", "synthetic_batches"]

"""Streaming training data with Ray Data: shards -> decode + augment + normalise (CPU tasks,
anywhere in the cluster) -> each Ray Train worker's disjoint share -> padded batches.

The driver builds the dataset and hands it to the trainer::

    ds = build_train_dataset(cfg.data.train_shards, cfg)
    trainer = TorchTrainer(loop, datasets={"train": ds}, dataset_config=train_data_config(), ...)

and each worker iterates its share, once per epoch::

    shard = ray.train.get_dataset_shard("train")
    for epoch in itertools.count(start_epoch):
        for batch in iter_train_batches(shard, cfg.data.batch_size_per_worker, cfg, epoch=epoch):
            ...

Reproducibility. Ray Data numbers the executions of a dataset (each pass the workers make over
their shards is one execution of the split dataset; `DataContext._execution_idx`, a private
attribute, read through `ray_compat.execution_index`, checked when the dataset is built); that number plus `start_epoch` is the
epoch. The shard files are read in an order drawn from (seed, start_epoch, execution)
(`FileShuffleConfig` with `reseed_after_execution`), each image's scale and flip come from an RNG
seeded by (seed, epoch, image id) (`transforms.augmentation_rng`), and `train_data_config()` sets
`preserve_order`, so rows reach Ray Train's split in a fixed order and each worker gets the same
images in the same order on every run. Without `preserve_order` the augmentation of each image
is still reproducible, the order is not. A run resumed with `start_epoch=k` repeats epoch k's
augmentation exactly; its file order is a different (still seeded) draw.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data import DataContext, FileShuffleConfig
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.extensions import ArrowVariableShapedTensorArray

from .. import ray_compat
from ..config import Config, InputConfig
from . import transforms
from .manifest import CategoryMap, read_manifest, shard_paths
from .schema import TRAIN_COLUMNS

DEFAULT_MAP_BATCH_SIZE = 4


def _current_epoch(start_epoch: int) -> int:
    """The epoch of the execution this Ray Data task belongs to (see the module docstring)."""
    return int(start_epoch) + ray_compat.execution_index()


def _check_ray_data_supports_epochs() -> None:
    """Fails at build time, not in a Ray Data task, when the execution index is gone."""
    ray_compat.execution_index()


def _variable_tensors(arrays: list[np.ndarray]) -> pa.Array:
    """A Ray variable-shaped tensor column, even when all shapes happen to agree (a fixed-shape
    column in one block and a variable one in the next would not concatenate)."""
    return ArrowVariableShapedTensorArray.from_numpy(arrays)


def transform_train_batch(
    batch: pa.Table,
    input_cfg: InputConfig,
    categories: CategoryMap,
    seed: int,
    start_epoch: int = 0,
    epoch: int | None = None,
) -> pa.Table:
    """The `map_batches` function: shard rows -> augmented, normalised samples, one row each.

    Output columns: image_id, epoch, image (float32 (3, h, w)), masks (uint8 (M, h, w)),
    boxes (float32 (M, 4) xyxy), labels (int64 (M,)), iscrowd (uint8 (M,)), height, width
    (after resize), orig_height, orig_width. `epoch` None: the current Ray Data execution's."""
    if epoch is None:
        epoch = _current_epoch(start_epoch)
    samples = [
        transforms.train_sample(row, categories, input_cfg, seed, epoch)
        for row in batch.to_pylist()
    ]
    return pa.table(
        {
            "image_id": pa.array([s["image_id"] for s in samples], pa.int64()),
            "epoch": pa.array([s["epoch"] for s in samples], pa.int64()),
            "image": _variable_tensors([s["image"] for s in samples]),
            "masks": _variable_tensors([s["masks"] for s in samples]),
            "boxes": _variable_tensors([s["boxes"] for s in samples]),
            "labels": _variable_tensors([s["labels"] for s in samples]),
            "iscrowd": _variable_tensors([s["iscrowd"].astype(np.uint8) for s in samples]),
            "height": pa.array([s["size"][0] for s in samples], pa.int32()),
            "width": pa.array([s["size"][1] for s in samples], pa.int32()),
            "orig_height": pa.array([s["orig_size"][0] for s in samples], pa.int32()),
            "orig_width": pa.array([s["orig_size"][1] for s in samples], pa.int32()),
        }
    )


@contextmanager
def _parquet_reader_v1() -> Iterator[None]:
    """Ray 2.60's default (V2) Parquet reader lists the files and reads their footers with 32
    new actors on *every* execution, i.e. at every epoch start (~10 s on a 2-core machine); the
    V1 reader reads the footers once, when the dataset is built, and its per-epoch start-up is
    under a second. Both honour `FileShuffleConfig` per execution."""
    ctx = DataContext.get_current()
    if not hasattr(ctx, "use_datasource_v2"):
        yield
        return
    saved = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = saved


def build_train_dataset(
    shards_dir: str | Path,
    cfg: Config,
    *,
    start_epoch: int = 0,
    map_batch_size: int = DEFAULT_MAP_BATCH_SIZE,
    num_cpus: float = 1.0,
):
    """The training `ray.data.Dataset` of a shards folder: read (files in a per-epoch seeded
    order) -> `map_batches(transform_train_batch)` in CPU tasks. Lazy: nothing runs until it is
    iterated. `start_epoch`: the epoch of its first execution (set it when resuming a run, so
    the augmentation does not repeat epoch 0's). Needs `ray.init()` to have been called, or
    starts a local Ray."""
    _check_ray_data_supports_epochs()
    manifest = read_manifest(shards_dir)
    paths = [str(p) for p in shard_paths(shards_dir, manifest)]
    if not paths:
        raise ValueError(f"{shards_dir}: the manifest lists no shard with images")
    categories = CategoryMap.from_manifest(manifest)
    seed = int(cfg.data.seed)
    with _parquet_reader_v1():
        ds = ray.data.read_parquet(
            paths,
            shuffle=FileShuffleConfig(
                seed=seed + 1_000_003 * int(start_epoch), reseed_after_execution=True
            ),
            override_num_blocks=len(paths),
        )
    # Small blocks, so the map below runs as many parallel tasks (a read task may return a
    # whole shard, or several small shards, as one block).
    ds = ds.select_columns(TRAIN_COLUMNS).repartition(target_num_rows_per_block=map_batch_size)
    return ds.map_batches(
        transform_train_batch,
        batch_size=map_batch_size,
        batch_format="pyarrow",
        zero_copy_batch=True,
        num_cpus=num_cpus,
        fn_kwargs={
            "input_cfg": cfg.input,
            "categories": categories,
            "seed": seed,
            "start_epoch": int(start_epoch),
        },
    )


def train_data_config():
    """The `ray.train.DataConfig` for `TorchTrainer(dataset_config=...)`: splits "train" across
    the workers with Ray Train's defaults plus `preserve_order`, which makes each worker's share
    and order reproducible (see the module docstring). Other datasets are not split."""
    import ray.train  # not at import: Ray Data's map tasks import this module

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options={"train": options})


class TrainCollate(NumpyBatchCollateFn):
    """Ray Data collate (runs in the iterator's background threads): a numpy batch of
    `transform_train_batch` rows -> the training batch of `transforms.collate_train`, plus
    "epochs" (the epoch each row was augmented for; `iter_train_batches` removes it)."""

    def __init__(self, size_divisibility: int) -> None:
        self.size_divisibility = int(size_divisibility)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["image_id"])
        samples = [
            {
                "image_id": batch["image_id"][i],
                "image": batch["image"][i],
                "masks": batch["masks"][i],
                "boxes": batch["boxes"][i],
                "labels": batch["labels"][i],
                "iscrowd": batch["iscrowd"][i],
                "size": (batch["height"][i], batch["width"][i]),
                "orig_size": (batch["orig_height"][i], batch["orig_width"][i]),
            }
            for i in range(n)
        ]
        out = transforms.collate_train(samples, self.size_divisibility)
        out["epochs"] = [int(e) for e in batch["epoch"]]
        return out


def _world_rank() -> int:
    """This Train worker's rank; 0 outside Ray Train (local training, tests)."""
    import ray.train

    try:
        context = ray.train.get_context()
    except RuntimeError:  # Ray Train's answer outside a training function
        return 0
    return int(context.get_world_rank())


def local_shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    return int(
        np.random.SeedSequence([seed % 2**32, epoch % 2**32, rank % 2**32, 7]).generate_state(1)[0]
    )


_warned_epochs: set[int] = set()  # warn once per process about data/loop epoch mismatches


def iter_train_batches(
    dataset_shard,
    batch_size: int,
    cfg: Config,
    epoch: int | None = None,
    *,
    prefetch_batches: int = 2,
    shuffle_buffer: int = 0,
    drop_last: bool = True,
) -> Iterator[dict[str, Any]]:
    """One epoch of training batches from what `ray.train.get_dataset_shard("train")` returns
    (or any `ray.data` iterator or Dataset built by `build_train_dataset`).

    Each batch: {"images" float32 (B, 3, Hp, Wp) normalised, zero-padded at the bottom/right to
    a multiple of cfg.input.size_divisibility; "image_sizes" [(h, w)] after resize, before
    padding; "targets" [{"boxes" float32 (M, 4) xyxy, "labels" int64 (M,), "masks" uint8
    (M, h, w), "iscrowd" bool (M,)}]; "image_ids" [int]; "orig_sizes" [(H, W)]}, on the CPU.

    `epoch`: the epoch the caller is in; it seeds the local shuffle buffer (with the worker's
    rank) and is checked against the epoch the data was augmented for (a mismatch, e.g. after
    resuming without `build_train_dataset(start_epoch=...)`, warns once per process).
    `shuffle_buffer`:
    rows of a seeded local shuffle buffer (0: off; the file order is already shuffled per epoch).
    Collation runs in Ray's background threads, `prefetch_batches` ahead."""
    buffer = int(shuffle_buffer) if shuffle_buffer else None
    if buffer is not None and buffer < batch_size:
        buffer = batch_size
    seed = local_shuffle_seed(cfg.data.seed, epoch or 0, _world_rank()) if buffer else None
    for batch in dataset_shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=TrainCollate(cfg.input.size_divisibility),
        device="cpu",
        prefetch_batches=prefetch_batches,
        drop_last=drop_last,
        local_shuffle_buffer_size=buffer,
        local_shuffle_seed=seed,
    ):
        epochs = batch.pop("epochs")
        if epoch is not None and any(e != epoch for e in epochs) and not _warned_epochs:
            warnings.warn(
                f"iter_train_batches(epoch={epoch}): the data was augmented for epoch "
                f"{sorted(set(epochs))}; when resuming, build the dataset with "
                "build_train_dataset(..., start_epoch=<the epoch to resume at>)",
                stacklevel=2,
            )
            _warned_epochs.add(epoch)
        yield batch


class DataWaitMeter:
    """Measures how long a training loop waits for data: wrap the batch iterator, run the steps,
    read `summary()`. Time blocked in `next()` is data wait; the rest of the wall time is the
    step itself. The first batch (pipeline start-up) is reported separately, not in the
    steady-state fraction. This is the hook the training loop uses for the "data wait under 5%
    of step time" goal of benchmarks/data.py."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self._it = iter(batches)
        self.first_wait_s: float | None = None
        self.wait_s = 0.0  # after the first batch
        self.batches = 0
        self._t_first: float | None = None
        self._t_last: float | None = None

    def __iter__(self) -> DataWaitMeter:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            batch = next(self._it)
        finally:
            t1 = time.perf_counter()
            self._t_last = t1
        if self.first_wait_s is None:
            self.first_wait_s = t1 - t0
            self._t_first = t1
        else:
            self.wait_s += t1 - t0
        self.batches += 1
        return batch

    def summary(self) -> dict[str, float]:
        """{"batches", "first_batch_s", "data_wait_s", "elapsed_s", "data_wait_fraction"}; the
        elapsed time runs from the first batch's arrival to the last `next()` call."""
        elapsed = (self._t_last - self._t_first) if self._t_first is not None else 0.0
        return {
            "batches": float(self.batches),
            "first_batch_s": float(self.first_wait_s or 0.0),
            "data_wait_s": self.wait_s,
            "elapsed_s": elapsed,
            "data_wait_fraction": self.wait_s / elapsed if elapsed > 0 else 0.0,
        }

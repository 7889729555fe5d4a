"""Ray Data streaming: the batch contract, per-epoch reproducible augmentation and order, and
two Ray Train workers seeing disjoint images. One local Ray for the session (`ray_local`)."""

from __future__ import annotations

import json
import threading
import warnings

import numpy as np
import pytest
import torch

from tensormask_ray.config import load_config
from tensormask_ray.data import transforms as T
from tensormask_ray.data.dataset import (
    DataWaitMeter,
    build_train_dataset,
    iter_train_batches,
    train_data_config,
)
from tensormask_ray.data.manifest import read_manifest

from ..fresh_process import not_loaded, run_python

pytestmark = pytest.mark.ray

NUM_IMAGES = 24  # conftest.SYNTH_NUM_IMAGES


@pytest.fixture(scope="module")
def cfg():
    # small images, so the tests stay quick
    return load_config(preset="cpu-small", overrides=["data.seed=11"])


def _epoch(ds, cfg, epoch, batch_size=4):
    """{image_id: (image (3, h, w), target, size)} of one pass, and the ids in arrival order."""
    seen, order = {}, []
    for batch in iter_train_batches(ds, batch_size, cfg, epoch=epoch, drop_last=False):
        for i, image_id in enumerate(batch["image_ids"]):
            h, w = batch["image_sizes"][i]
            seen[image_id] = (batch["images"][i, :, :h, :w].clone(), batch["targets"][i], (h, w))
            order.append(image_id)
    return seen, order


@pytest.fixture(scope="module")
def two_epochs(ray_local, synth_shards, cfg):
    """Two passes over one dataset (executions 0 and 1 = epochs 0 and 1), in a fixed order."""
    ds = build_train_dataset(synth_shards, cfg)
    ds.context.execution_options.preserve_order = True
    return [_epoch(ds, cfg, e) for e in range(2)]


def test_batches_follow_the_contract(ray_local, synth_shards, cfg):
    ds = build_train_dataset(synth_shards, cfg)
    num_classes = len(read_manifest(synth_shards)["categories"])
    lo, hi = cfg.input.min_size_train
    ids = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no epoch-mismatch warning, no read-only-array warning
        for batch in iter_train_batches(ds, 5, cfg, epoch=0, drop_last=False):
            images = batch["images"]
            b = len(batch["image_ids"])
            assert (
                images.dtype == torch.float32 and images.dim() == 4 and images.shape[:2] == (b, 3)
            )
            assert images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
            assert (
                len(batch["targets"]) == len(batch["image_sizes"]) == len(batch["orig_sizes"]) == b
            )
            hmax, wmax = (max(s[k] for s in batch["image_sizes"]) for k in (0, 1))
            assert hmax <= images.shape[2] < hmax + 32 and wmax <= images.shape[3] < wmax + 32
            for i, (h, w) in enumerate(batch["image_sizes"]):
                assert lo <= min(h, w) <= hi or max(h, w) == cfg.input.max_size_train
                assert images[i, :, h:, :].eq(0).all() and images[i, :, :, w:].eq(0).all()
                t = batch["targets"][i]
                m = t["masks"].shape[0]
                assert t["masks"].dtype == torch.uint8 and tuple(t["masks"].shape) == (m, h, w)
                assert t["boxes"].dtype == torch.float32 and tuple(t["boxes"].shape) == (m, 4)
                assert t["labels"].dtype == torch.int64 and tuple(t["labels"].shape) == (m,)
                assert t["iscrowd"].dtype == torch.bool and tuple(t["iscrowd"].shape) == (m,)
                if m:
                    assert 0 <= t["labels"].min() and t["labels"].max() < num_classes
                    tight, valid = T.masks_to_boxes(t["masks"].numpy())
                    np.testing.assert_array_equal(t["boxes"].numpy()[valid], tight[valid])
                    assert (t["boxes"][:, 2:] <= torch.tensor([w, h])).all() and (
                        t["boxes"] >= 0
                    ).all()
            ids += batch["image_ids"]
    assert sorted(ids) == list(range(1, NUM_IMAGES + 1))


def test_augmentation_changes_with_the_epoch_and_repeats_with_the_seed(
    ray_local, synth_shards, cfg, two_epochs
):
    (e0, order0), (e1, order1) = two_epochs
    assert sorted(e0) == sorted(e1) == list(range(1, NUM_IMAGES + 1))
    assert sum(e0[i][2] != e1[i][2] for i in e0) > NUM_IMAGES // 2, "new scales every epoch"
    assert order0 != order1, "the file order is reshuffled every epoch"

    # a fresh dataset with the same seed gives epoch 0 again: same order, same pixels
    again = build_train_dataset(synth_shards, cfg)
    again.context.execution_options.preserve_order = True
    r0, rorder0 = _epoch(again, cfg, 0)
    assert rorder0 == order0
    for image_id, (image, target, size) in e0.items():
        assert r0[image_id][2] == size
        assert torch.equal(r0[image_id][0], image)
        assert torch.equal(r0[image_id][1]["masks"], target["masks"])
        assert torch.equal(r0[image_id][1]["boxes"], target["boxes"])

    # and equals the sample made directly by transforms.train_sample for (seed, epoch, image id)
    import pyarrow.parquet as pq

    from tensormask_ray.data.manifest import CategoryMap

    row = pq.read_table(next(synth_shards.glob("shard-*.parquet"))).to_pylist()[0]
    direct = T.train_sample(
        row, CategoryMap.from_manifest(read_manifest(synth_shards)), cfg.input, 11, 1
    )
    assert e1[row["image_id"]][2] == direct["size"]
    np.testing.assert_array_equal(e1[row["image_id"]][0].numpy(), direct["image"])


def test_resuming_at_an_epoch_reproduces_its_augmentation(ray_local, synth_shards, cfg, two_epochs):
    (_, _), (e1, _) = two_epochs
    resumed = build_train_dataset(synth_shards, cfg, start_epoch=1)
    r1, _ = _epoch(resumed, cfg, 1)
    assert all(r1[i][2] == e1[i][2] and torch.equal(r1[i][0], e1[i][0]) for i in e1)
    from tensormask_ray.data import dataset as dataset_module

    dataset_module._warned_epochs.clear()  # the warning comes once per process
    with pytest.warns(UserWarning, match="augmented for epoch"):
        for _ in iter_train_batches(build_train_dataset(synth_shards, cfg), 4, cfg, epoch=3):
            break


def test_streaming_split_order_is_reproducible(ray_local, synth_shards, cfg):
    """What Ray Train does with the dataset (streaming_split, equal=True), with the
    preserve_order that `train_data_config()` sets: the same images in the same order per split."""

    def run():
        ds = build_train_dataset(synth_shards, cfg)
        ds.context.execution_options.preserve_order = True
        splits = ds.streaming_split(2, equal=True)
        out = [None, None]

        def consume(k):
            out[k] = [
                i for b in iter_train_batches(splits[k], 2, cfg, epoch=0) for i in b["image_ids"]
            ]

        threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        return out

    first, second = run(), run()
    assert first == second
    assert not set(first[0]) & set(first[1]) and len(first[0]) == len(first[1])


def _train_loop(config):
    import ray.train

    from tensormask_ray.config import from_dict
    from tensormask_ray.data.dataset import DataWaitMeter, iter_train_batches

    cfg = from_dict(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    seen = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(2):
            meter = DataWaitMeter(iter_train_batches(shard, 2, cfg, epoch=epoch))
            seen[epoch] = [i for b in meter for i in b["image_ids"]]
    record = {
        "seen": seen,
        "warnings": [str(w.message) for w in caught if "augmented for epoch" in str(w.message)],
    }
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump(record, f)
    ray.train.report({"images": sum(map(len, seen.values()))})


@pytest.mark.slow
def test_two_train_workers_see_disjoint_images(ray_local, synth_shards, cfg, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "out": str(tmp_path)},
        scaling_config=ScalingConfig(
            num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}
        ),
        run_config=RunConfig(name="disjoint", storage_path=str(tmp_path / "runs")),
        datasets={"train": build_train_dataset(synth_shards, cfg)},
        dataset_config=train_data_config(),
        torch_config=TorchConfig(backend="gloo"),
    )
    trainer.fit()
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in ("0", "1"):
        a, b = (set(r["seen"][epoch]) for r in records)
        assert a and b and not a & b, f"epoch {epoch}: workers share images {a & b}"
        assert len(records[0]["seen"][epoch]) == len(records[1]["seen"][epoch])  # equal split
        assert len(a | b) >= NUM_IMAGES - 4  # equal split and whole batches drop at most a few
        assert a | b <= set(range(1, NUM_IMAGES + 1))
    assert records[0]["seen"]["0"] != records[0]["seen"]["1"], "a new order each epoch"
    assert records[0]["warnings"] == records[1]["warnings"] == [], "data epochs follow the loop's"


def test_data_wait_meter(monkeypatch):
    """Time in next() is data wait, the rest is the step; the first batch is reported apart. On
    a clock the test drives (no sleeping, no timing on a shared machine): exact figures."""
    import types

    from tensormask_ray.data import dataset

    clock = {"now": 0.0}
    monkeypatch.setattr(dataset, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))

    def loader():
        clock["now"] += 0.5  # start-up
        yield 0
        for i in range(1, 4):
            clock["now"] += 0.05  # waiting for batch i
            yield i

    meter = DataWaitMeter(loader())
    seen = []
    for batch in meter:
        seen.append(batch)
        clock["now"] += 0.15  # a step
    s = meter.summary()
    assert seen == [0, 1, 2, 3] and s["batches"] == 4
    assert s["first_batch_s"] == pytest.approx(0.5)
    assert s["data_wait_s"] == pytest.approx(3 * 0.05)
    assert s["elapsed_s"] == pytest.approx(4 * 0.15 + 3 * 0.05)  # first arrival to the last next()
    assert s["data_wait_fraction"] == pytest.approx(0.15 / 0.75)


def test_world_rank_is_zero_outside_ray_train_and_errors_are_not_hidden(monkeypatch):
    import ray.train

    from tensormask_ray.data import dataset

    assert dataset._world_rank() == 0  # Ray Train's RuntimeError outside a training function

    class Context:
        def get_world_rank(self):
            return 3

    monkeypatch.setattr(ray.train, "get_context", lambda: Context())
    assert dataset._world_rank() == 3
    monkeypatch.setattr(ray.train, "get_context", lambda: object())  # a context without the method
    with pytest.raises(AttributeError):
        dataset._world_rank()


def test_the_map_tasks_run_without_importing_torch(synth_shards):
    """Ray Data's map tasks import this module (to unpickle `transform_train_batch`) in fresh
    worker processes; on a 2-core machine torch's import there delayed every run's first batch."""
    code = (
        "import pyarrow.parquet as pq\n"
        "from tensormask_ray.config import load_config\n"
        "from tensormask_ray.data.dataset import transform_train_batch\n"
        "from tensormask_ray.data.manifest import CategoryMap, read_manifest, shard_paths\n"
        "from tensormask_ray.data.schema import TRAIN_COLUMNS\n"
        f"shards = {str(synth_shards)!r}\n"
        "manifest = read_manifest(shards)\n"
        "table = pq.read_table(shard_paths(shards, manifest)[0], columns=TRAIN_COLUMNS)\n"
        "cfg = load_config(preset='cpu-small')\n"
        "out = transform_train_batch(table.slice(0, 2), cfg.input, CategoryMap.from_manifest(manifest), 0, epoch=0)\n"
        "assert out.num_rows == 2\n" + not_loaded("torch", "ray.train")
    )
    run_python(code)

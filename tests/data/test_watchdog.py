"""The data watchdog: a training loop that gets no batch in time fails with a message saying what
Ray Data waits for, instead of hanging (tensormask_ray/data/watchdog.py)."""

from __future__ import annotations

import threading
import time

import pytest

from tensormask_ray.data.watchdog import DataStalledError, DataWatchdog, describe_data_wait


def never_yields(released: threading.Event):
    released.wait()  # a Ray Data iterator whose tasks never get scheduled
    yield "late"


def test_a_dataset_that_never_yields_fails_within_the_timeout():
    released = threading.Event()
    t0 = time.perf_counter()
    with pytest.raises(
        DataStalledError,
        match=r"no training batch arrived for 0.5 s \(train.data_timeout_s\): waits for CPUs",
    ):
        next(DataWatchdog(never_yields(released), 0.5, describe=lambda: "waits for CPUs"))
    assert time.perf_counter() - t0 < 3.0
    released.set()


def test_batches_pass_through_and_slow_steps_do_not_count():
    def three():
        yield from (1, 2, 3)

    watchdog = DataWatchdog(three(), 0.5)
    seen = []
    for batch in watchdog:
        time.sleep(0.6)  # a training step longer than the timeout: the next batch is already there
        seen.append(batch)
    assert seen == [1, 2, 3]


def test_errors_of_the_data_pipeline_reach_the_training_loop():
    def broken():
        yield 1
        raise ValueError("shard 3 is damaged")

    watchdog = DataWatchdog(broken(), 5.0)
    assert next(watchdog) == 1
    with pytest.raises(ValueError, match="shard 3 is damaged"):
        next(watchdog)


def test_the_diagnosis_names_the_free_cpus(ray_local):
    free = ray_local.available_resources().get("CPU", 0.0)
    text = describe_data_wait(data_cpus=free + 1)
    assert (
        f"{free:g} of the cluster's {ray_local.cluster_resources()['CPU']:g} CPUs are free" in text
    )
    assert "train.cpus_per_worker" in text

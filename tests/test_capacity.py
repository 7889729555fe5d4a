"""No silent hangs at the start: a command whose workers would not fit beside Ray Data's tasks
fails in seconds with the numbers and the settings to change (tensormask_ray/capacity.py; issue
17: `train.cpus_per_worker=2` on a 2-core machine hung forever)."""

from __future__ import annotations

import time

import pytest

from tensormask_ray import cli
from tensormask_ray.capacity import (
    Reservation,
    check_capacity,
    inference_reservation,
    shortfall,
    sweep_reservation,
    train_reservation,
)
from tensormask_ray.errors import UserError


def test_shortfall_counts_workers_and_a_cpu_for_ray_data_and_says_what_fits():
    assert shortfall(train_reservation(2, 1.0, False), {"CPU": 3.0}) is None
    text = shortfall(train_reservation(2, 2.0, False), {"CPU": 2.0})  # issue 17's hang on 2 cores
    assert (
        "5 CPUs (2 Train workers x 2 CPU = 4, plus 1 for Ray Data's tasks) and the Ray cluster has 2 free"
        in text
    )
    assert text.endswith("What fits: train.cpus_per_worker=0.5")
    assert shortfall(train_reservation(4, 1.0, False), {"CPU": 4.0}).endswith(
        "What fits: train.cpus_per_worker=0.75; or --num-workers 3"
    )
    assert "Nothing fits" in shortfall(train_reservation(2, 1.0, False), {"CPU": 1.0})
    assert "1 GPUs" in shortfall(train_reservation(1, 0.5, True), {"CPU": 8.0})
    sweep = sweep_reservation(
        concurrent_trials=2, workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0, trial_cpus=0.01
    )
    assert sweep.total_cpus == pytest.approx(3.02)
    assert shortfall(sweep, {"CPU": 3.0}).endswith(
        "What fits: resources: {cpus_per_worker: 0.99} in the sweep spec; or max_concurrent_trials: 1"
    )
    actors = shortfall(inference_reservation(2, 1.0, 0.0), {"CPU": 2.0})
    assert actors.endswith(
        "What fits: --cpus-per-actor 0.5; or --num-actors 1; or --num-actors 0 (in this process, no Ray)"
    )


def _idle_cpus(ray, timeout: float = 60.0) -> float:
    """The session Ray's CPUs once every one is free: actors of an earlier test in this process
    may still be releasing theirs, and a count read meanwhile would be too low."""
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    free = ray.available_resources().get("CPU", 0)
    assert free == total, f"the session's Ray still has {total - free:g} of {total:g} CPUs held"
    return free


def test_a_request_for_every_cpu_fails_in_seconds_and_a_fitting_one_passes(ray_local):
    cpus = _idle_cpus(ray_local)
    t0 = time.perf_counter()
    with pytest.raises(
        UserError, match=rf"training cannot start: it needs {cpus + 1:g} CPUs .* has {cpus:g} free"
    ):
        check_capacity(train_reservation(2, cpus / 2, False), "training", settle_s=1.0)
    assert time.perf_counter() - t0 < 10
    check_capacity(Reservation("1 worker x 1 CPU", 1, 1.0), "training")  # fits: returns


def test_train_with_workers_holding_every_cpu_is_a_clear_error(
    ray_local, synth_shards, tmp_path, capsys
):
    cpus = _idle_cpus(ray_local)
    t0 = time.perf_counter()
    rc = cli.main(["train", "--preset", "cpu-small", "model.num_classes=4", f"data.train_shards={synth_shards}",
                   f"train.cpus_per_worker={cpus / 2:g}", "--num-workers", "2", "--storage-path", str(tmp_path / "runs"),
                   "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert (
        rc == 2 and time.perf_counter() - t0 < 60
    )  # seconds on a quiet machine; no hang on a loaded one
    assert (
        "tensormask-ray train: error: training cannot start" in err
        and "What fits: train.cpus_per_worker=1.5" in err
    )
    assert (
        not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    )  # nothing to clean up


def test_a_sweep_whose_trials_do_not_fit_fails_before_anything_is_recorded(
    ray_local, synth_shards, tmp_path
):
    from tensormask_ray.tune.spec import parse_spec
    from tensormask_ray.tune.sweep import run_sweep

    cpus = ray_local.available_resources()["CPU"]
    raw = {"name": "big", "preset": "cpu-small", "search": {"solver.base_lr": {"grid": [0.01, 0.02]}}, "metric": "train/loss",
           "mode": "min", "max_concurrent_trials": 2, "resources": {"workers": 1, "cpus_per_worker": cpus / 2}}  # fmt: skip
    with pytest.raises(
        UserError,
        match=r"sweep 'big' cannot start: .*2 trials at a time x \(1 Train worker.*What fits: resources: \{cpus_per_worker: 1.49\}",
    ):
        run_sweep(parse_spec(raw, "big.yaml"), ["model.num_classes=4", f"data.train_shards={synth_shards}"],
                  storage_path=str(tmp_path / "sweeps"), mlflow_uri=f"sqlite:///{tmp_path / 'm.db'}")  # fmt: skip
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "m.db").exists()

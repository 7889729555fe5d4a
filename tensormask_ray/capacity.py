"""No silent hangs at the start: does the Ray cluster have room for what a command reserves?

Ray schedules what fits and lets the rest wait, without a deadline: Train workers that ask for
more CPUs than the cluster has wait forever, and workers that take every CPU leave none for Ray
Data's read and transform tasks, which then wait forever while the workers wait for data. Before
training, a sweep or batch inference starts, `check_capacity` compares what it will reserve with
the cluster's free CPUs and GPUs (`ray.available_resources()`) and fails within seconds, naming
the numbers and the settings that change them.

On an autoscaling cluster, free resources grow on demand: set TENSORMASK_CAPACITY_CHECK=0 there.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from .errors import UserError

CHECK_ENV = "TENSORMASK_CAPACITY_CHECK"
DATA_CPUS = 1.0  # Ray Data's read / transform / re-blocking tasks each ask for one CPU


@dataclass(frozen=True)
class Reservation:
    """What a command reserves: `units` x (`cpus`, `gpus`) held for its whole run (Train
    workers, trials, inference actors), plus `data_cpus` that must stay free for Ray Data."""

    what: str  # the units and what each holds: "2 Train workers x 1 CPU", ...
    units: int
    cpus: float  # per unit
    gpus: float = 0.0  # per unit
    data_cpus: float = DATA_CPUS
    fixes: list[str] = field(default_factory=list)  # settings that change the reservation

    @property
    def total_cpus(self) -> float:
        return self.units * self.cpus + self.data_cpus

    @property
    def total_gpus(self) -> float:
        return self.units * self.gpus


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def shortfall(reservation: Reservation, free: dict[str, float]) -> str | None:
    """Why `reservation` does not fit in the `free` resources, or None when it fits."""
    r = reservation
    free_cpus, free_gpus = float(free.get("CPU", 0.0)), float(free.get("GPU", 0.0))
    problems = []
    if r.total_cpus > free_cpus + 1e-9:
        problems.append(
            f"{_fmt(r.total_cpus)} CPUs ({r.what} = {_fmt(r.units * r.cpus)}, plus "
            f"{_fmt(r.data_cpus)} for Ray Data's tasks) but the Ray cluster has {_fmt(free_cpus)} free"
        )
    if r.total_gpus > free_gpus + 1e-9:
        problems.append(f"{_fmt(r.total_gpus)} GPUs ({r.units} x {_fmt(r.gpus)}) but the Ray cluster has {_fmt(free_gpus)} free")
    if not problems:
        return None
    text = "it needs " + "; and ".join(problems) + ", so it would wait forever"
    if r.fixes:
        text += ". Change " + ", ".join(r.fixes)
    return text


def check_capacity(reservation: Reservation, command: str, settle_s: float = 5.0) -> None:
    """Raises UserError when the running Ray cluster cannot hold `reservation`. Resources the
    previous step held (a finished training run's workers) are released asynchronously: a
    shortfall is re-checked for up to `settle_s` seconds before it is an error."""
    if os.environ.get(CHECK_ENV, "1").strip().lower() in ("0", "false", "no"):
        return
    import ray

    deadline = time.monotonic() + settle_s
    while (problem := shortfall(reservation, ray.available_resources())) and time.monotonic() < deadline:
        time.sleep(0.5)
    if problem:
        raise UserError(
            f"{command} cannot start: {problem} (or give the cluster more resources; on an autoscaling cluster "
            f"set {CHECK_ENV}=0)"
        )


def train_reservation(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> Reservation:
    return Reservation(
        what=f"{num_workers} Train worker{'s' if num_workers != 1 else ''} x {_fmt(cpus_per_worker)} CPU",
        units=num_workers,
        cpus=cpus_per_worker,
        gpus=1.0 if use_gpu else 0.0,
        fixes=[f"train.cpus_per_worker (now {_fmt(cpus_per_worker)})", f"--num-workers (now {num_workers})"],
    )


def sweep_reservation(concurrent_trials: int, workers: int, cpus_per_worker: float, gpus_per_worker: float, trial_cpus: float) -> Reservation:
    """Trials that run at once each hold their Train workers (and the trial function's own
    small request); one Ray Data task at a time keeps every trial's data flowing."""
    return Reservation(
        what=(
            f"{concurrent_trials} trial{'s' if concurrent_trials != 1 else ''} at a time x ({workers} Train "
            f"worker{'s' if workers != 1 else ''} x {_fmt(cpus_per_worker)} CPU + {_fmt(trial_cpus)} for the trial)"
        ),
        units=concurrent_trials,
        cpus=workers * cpus_per_worker + trial_cpus,
        gpus=workers * gpus_per_worker,
        fixes=[
            f"`resources` of the sweep spec (workers {workers}, cpus_per_worker {_fmt(cpus_per_worker)})",
            f"its max_concurrent_trials (now {concurrent_trials})",
        ],
    )


def inference_reservation(num_actors: int, cpus_per_actor: float, gpus_per_actor: float) -> Reservation:
    return Reservation(
        what=f"{num_actors} inference actor{'s' if num_actors != 1 else ''} x {_fmt(cpus_per_actor)} CPU",
        units=num_actors,
        cpus=cpus_per_actor,
        gpus=gpus_per_actor,
        fixes=[f"--num-actors (now {num_actors})", f"--cpus-per-actor (now {_fmt(cpus_per_actor)})", "or --num-actors 0 (in this process)"],
    )


__all__ = [
    "CHECK_ENV",
    "Reservation",
    "check_capacity",
    "inference_reservation",
    "shortfall",
    "sweep_reservation",
    "train_reservation",
]

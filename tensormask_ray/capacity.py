"""No silent hangs at the start: does the Ray cluster have room for what a command reserves?

Ray schedules what fits and lets the rest wait, without a deadline: Train workers that ask for
more CPUs than the cluster has wait forever, and workers that take every CPU leave none for Ray
Data's read and transform tasks, which then wait forever while the workers wait for data. Before
training, a sweep or batch inference starts, `check_capacity` compares what it will reserve with
the cluster's free CPUs and GPUs (`ray.available_resources()`) and fails within seconds, naming
the numbers and settings that would fit.

On an autoscaling cluster, free resources grow on demand: set TENSORMASK_CAPACITY_CHECK=0 there.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UserError

CHECK_ENV = "TENSORMASK_CAPACITY_CHECK"
DATA_CPUS = 1.0  # Ray Data's read / transform / re-blocking tasks each ask for one CPU


@dataclass(frozen=True)
class Reservation:
    """What a command reserves: `units` x (`cpus`, `gpus`) held for its whole run (Train
    workers, trials, inference actors), plus `data_cpus` that must stay free for Ray Data.
    `fits(room)`: the settings that would fit in `room` CPUs (after Ray Data's)."""

    what: str  # the units and what each holds: "2 Train workers x 1 CPU", ...
    units: int
    cpus: float  # per unit
    gpus: float = 0.0  # per unit
    data_cpus: float = DATA_CPUS
    fits: Callable[[float], list[str]] | None = None

    @property
    def total_cpus(self) -> float:
        return self.units * self.cpus + self.data_cpus

    @property
    def total_gpus(self) -> float:
        return self.units * self.gpus


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _share(room: float, parts: float) -> float | None:
    """room / parts rounded down to a hundredth, None when under a tenth (too little to train)."""
    share = math.floor(100 * room / parts) / 100 if parts > 0 else 0.0
    return share if share >= 0.1 else None


def shortfall(reservation: Reservation, free: dict[str, float]) -> str | None:
    """Why `reservation` does not fit in the `free` resources, and what would; None when it fits."""
    r = reservation
    free_cpus, free_gpus = float(free.get("CPU", 0.0)), float(free.get("GPU", 0.0))
    if r.total_gpus > free_gpus + 1e-9:
        return (
            f"it needs {_fmt(r.total_gpus)} GPUs ({r.units} x {_fmt(r.gpus)}) and the Ray cluster has {_fmt(free_gpus)} "
            "free, so it would wait forever. Use fewer workers (or actors), or none on GPUs"
        )
    if r.total_cpus <= free_cpus + 1e-9:
        return None
    text = (
        f"it needs {_fmt(r.total_cpus)} CPUs ({r.what} = {_fmt(r.units * r.cpus)}, plus {_fmt(r.data_cpus)} "
        f"for Ray Data's tasks) and the Ray cluster has {_fmt(free_cpus)} free, so it would wait forever"
    )
    options = r.fits(free_cpus - r.data_cpus) if r.fits else []
    if options:
        return text + ". What fits: " + "; or ".join(options)
    return (
        text
        + f". Nothing fits beside Ray Data's {_fmt(r.data_cpus)} CPU: the cluster needs more CPUs"
    )


def check_capacity(reservation: Reservation, command: str, settle_s: float = 5.0) -> None:
    """Raises UserError when the running Ray cluster cannot hold `reservation`. Resources the
    previous step held (a finished training run's workers) are released asynchronously: a
    shortfall is re-checked for up to `settle_s` seconds before it is an error."""
    if os.environ.get(CHECK_ENV, "1").strip().lower() in ("0", "false", "no"):
        return
    import ray

    deadline = time.monotonic() + settle_s
    while (
        problem := shortfall(reservation, ray.available_resources())
    ) and time.monotonic() < deadline:
        time.sleep(0.5)
    if problem:
        raise UserError(
            f"{command} cannot start: {problem} (or give the cluster more; on an autoscaling cluster set {CHECK_ENV}=0)"
        )


def train_reservation(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> Reservation:
    def fits(room: float) -> list[str]:
        options = []
        if (cpus := _share(room, num_workers)) is not None:
            options.append(f"train.cpus_per_worker={cpus:g}")
        if 1 <= (workers := math.floor(room / cpus_per_worker + 1e-9)) < num_workers:
            options.append(f"--num-workers {workers}")
        return options

    return Reservation(
        what=f"{num_workers} Train worker{'s' if num_workers != 1 else ''} x {_fmt(cpus_per_worker)} CPU",
        units=num_workers,
        cpus=cpus_per_worker,
        gpus=1.0 if use_gpu else 0.0,
        fits=fits,
    )


def sweep_reservation(
    concurrent_trials: int,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    trial_cpus: float,
) -> Reservation:
    """Trials that run at once each hold their Train workers (and the trial function's own
    small request); one Ray Data task at a time keeps every trial's data flowing."""
    per_trial = workers * cpus_per_worker + trial_cpus

    def fits(room: float) -> list[str]:
        options = []
        if (cpus := _share(room / concurrent_trials - trial_cpus, workers)) is not None:
            options.append(f"resources: {{cpus_per_worker: {cpus:g}}} in the sweep spec")
        if 1 <= (trials := math.floor(room / per_trial + 1e-9)) < concurrent_trials:
            options.append(f"max_concurrent_trials: {trials}")
        return options

    return Reservation(
        what=(
            f"{concurrent_trials} trial{'s' if concurrent_trials != 1 else ''} at a time x ({workers} Train "
            f"worker{'s' if workers != 1 else ''} x {_fmt(cpus_per_worker)} CPU + {_fmt(trial_cpus)} for the trial)"
        ),
        units=concurrent_trials,
        cpus=per_trial,
        gpus=workers * gpus_per_worker,
        fits=fits,
    )


def inference_reservation(
    num_actors: int, cpus_per_actor: float, gpus_per_actor: float
) -> Reservation:
    def fits(room: float) -> list[str]:
        options = []
        if (cpus := _share(room, num_actors)) is not None:
            options.append(f"--cpus-per-actor {cpus:g}")
        if 1 <= (actors := math.floor(room / cpus_per_actor + 1e-9)) < num_actors:
            options.append(f"--num-actors {actors}")
        return options + ["--num-actors 0 (in this process, no Ray)"]

    return Reservation(
        what=f"{num_actors} inference actor{'s' if num_actors != 1 else ''} x {_fmt(cpus_per_actor)} CPU",
        units=num_actors,
        cpus=cpus_per_actor,
        gpus=gpus_per_actor,
        fits=fits,
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

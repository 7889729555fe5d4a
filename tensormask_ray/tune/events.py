"""A sweep's progress on the terminal: one line per trial event, with the trial's swept values.

`TrialEvents` is a Ray Tune callback (it runs in the driver, where Tune's loop runs); the sweep
turns Tune's own status tables off (`verbose=0`) and prints these instead::

    [sweep] trial 3f2a_00000 started: base_lr=0.001 mask_fg_weight=1.5
    [sweep] trial 3f2a_00000 iter 6: train/loss 2.31
    [sweep] trial 3f2a_00001 stopped early by ASHA at iter 6: train/loss 4.12 (best trial so far 2.31)
    [sweep] trial 3f2a_00000 finished: 12 iters, train/loss 1.98 (1m04s)
    [sweep] trial 3f2a_00002 failed (attempt 1 of 2, retrying): RuntimeError: ...
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from ..finite import finite_or_none
from ..train.progress import format_duration


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):  # a variant: its keys, without their section
        return ",".join(f"{k.rsplit('.', 1)[-1]}={_value(x)}" for k, x in v.items())
    if isinstance(v, list):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)


class TrialEvents(Callback):
    """Prints trial events. `keys`: the swept config keys (shown without their section);
    `metric`/`mode`: what the sweep compares; `max_t`: the iterations of a full trial (a trial
    that ends before is one the scheduler stopped early)."""

    def __init__(
        self, keys: list[str], metric: str, mode: str, max_t: int, scheduler: str = "ASHA"
    ):
        self.keys, self.metric, self.mode, self.max_t, self.scheduler = (
            list(keys),
            metric,
            mode,
            int(max_t),
            scheduler,
        )
        self._started: dict[str, float] = {}
        self._best: float | None = None

    def _say(self, trial, text: str) -> None:
        print(f"[sweep] trial {trial.trial_id} {text}", flush=True)

    def _values(self, trial) -> str:
        config = trial.config or {}
        return (
            " ".join(f"{k.rsplit('.', 1)[-1]}={_value(config.get(k))}" for k in self.keys)
            or "(no swept values)"
        )

    def _score(self, result: dict[str, Any]) -> str:
        value = finite_or_none((result or {}).get(self.metric))
        return f"{self.metric} {value:.4g}" if value is not None else f"{self.metric} -"

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._started[trial.trial_id] = time.time()
        self._say(trial, f"started: {self._values(trial)}")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        value = finite_or_none(result.get(self.metric))
        if value is not None:
            better = self._best is None or (
                value > self._best if self.mode == "max" else value < self._best
            )
            self._best = value if better else self._best
        self._say(trial, f"iter {result.get('iteration', '?')}: {self._score(result)}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        done = int(result.get("iteration", 0) or 0)
        took = format_duration(time.time() - self._started.get(trial.trial_id, time.time()))
        if done < self.max_t:
            best = f" (best trial so far {self._best:.4g})" if self._best is not None else ""
            self._say(
                trial,
                f"stopped early by {self.scheduler} at iter {done}: {self._score(result)}{best}",
            )
        else:
            self._say(trial, f"finished: {done} iters, {self._score(result)} ({took})")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._say(
            trial,
            f"failed (attempt {trial.num_failures} of {trial.max_failures + 1}, retrying): {self._error(trial)}",
        )

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._say(
            trial,
            f"FAILED after {trial.num_failures} attempt(s): {self._error(trial)} (details: {trial.path})",
        )

    @staticmethod
    def _error(trial) -> str:
        try:
            error = trial.get_error()
        except Exception:  # noqa: BLE001 - the event matters more than its text
            error = None
        if error is None:
            return "see the log file"
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        return (lines[-1] if lines else type(error).__name__)[:300]


__all__ = ["TrialEvents"]

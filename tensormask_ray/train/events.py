"""Warnings from a training run that matter to the user, in our words.

`WorkerFailures` is a Ray Train callback; it runs in the run's controller (a Ray actor), whose
output Ray forwards to the driver, where the console shows lines tagged `[warning]`.
"""

from __future__ import annotations

from ray.train import UserCallback


class WorkerFailures(UserCallback):
    """One line when training workers raise: which ranks, the error, and whether Ray Train will
    restart the worker group from the latest checkpoint (train.max_failures) or give up."""

    def __init__(self, max_failures: int):
        self.max_failures = int(max_failures)
        self.failures = 0

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        self.failures += 1
        ranks = ", ".join(str(r) for r in sorted(worker_exceptions))
        first = worker_exceptions[min(worker_exceptions)]
        text = (str(first).strip().splitlines() or [""])[-1][:300]
        what = f"{type(first).__name__}: {text}" if text else type(first).__name__
        if self.max_failures < 0 or self.failures <= self.max_failures:
            then = (
                f"restarting the workers from the latest checkpoint (restart {self.failures} of "
                f"{'unlimited' if self.max_failures < 0 else self.max_failures}, train.max_failures)"
            )
        else:
            then = f"no restarts left (train.max_failures={self.max_failures}): the run fails"
        print(f"[warning] training worker rank {ranks} failed ({what}); {then}", flush=True)


__all__ = ["WorkerFailures"]

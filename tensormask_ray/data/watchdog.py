"""No silent hangs while training: a batch iterator that fails when no batch arrives in time.

Ray Data runs its read and transform tasks wherever the cluster has room; when it has none (the
Train workers hold every CPU, a node went away) the training loop would block in `next()` forever
with nothing on the terminal. `DataWatchdog` pulls the batches in a background thread and raises
`DataStalledError` when the next batch takes longer than `timeout_s`, with a message saying what
Ray Data is waiting for (from the cluster's free and total resources).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_END = object()


class DataStalledError(RuntimeError):
    """No training batch arrived within the configured time (train.data_timeout_s)."""


def describe_data_wait(data_cpus: float = 1.0) -> str:
    """What Ray Data is most likely waiting for, from the cluster's resources right now."""
    try:
        import ray

        if not ray.is_initialized():
            return "Ray is not running in this process, so Ray Data cannot schedule its tasks"
        free = ray.available_resources().get("CPU", 0.0)
        total = ray.cluster_resources().get("CPU", 0.0)
    except Exception as e:  # noqa: BLE001 - a diagnosis must not hide the stall itself
        return f"the cluster's resources could not be read ({type(e).__name__}: {e})"
    if free < data_cpus:
        return (
            f"Ray Data is waiting for CPUs to run its read and transform tasks: each needs {data_cpus:g} CPU, and "
            f"{free:g} of the cluster's {total:g} CPUs are free (the training workers and other jobs hold the rest). "
            "Lower train.cpus_per_worker or --num-workers, or add CPUs to the cluster"
        )
    return (
        f"{free:g} of the cluster's {total:g} CPUs are free, so Ray Data is not short of CPUs: its tasks may be "
        "failing and being retried, or reading the shards is very slow. The log file printed at the start has "
        "Ray Data's messages"
    )


class DataWatchdog(Iterator[Any]):
    """Iterates `batches` in a background thread; `next()` raises DataStalledError when the
    next batch takes more than `timeout_s` (0 or less: wait forever). The first batch includes
    the pipeline's start-up, so give the timeout some room. Exceptions of the underlying
    iterator are re-raised in the caller's thread. `describe()` explains the stall."""

    def __init__(
        self,
        batches: Iterable[Any],
        timeout_s: float,
        describe: Callable[[], str] = describe_data_wait,
        what: str = "training batch",
        setting: str = "train.data_timeout_s",
    ):
        self.timeout_s = float(timeout_s)
        self.describe, self.what, self.setting = describe, what, setting
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._pull, args=(iter(batches),), name="data-watchdog", daemon=True
        )
        self._thread.start()

    def _pull(self, it: Iterator[Any]) -> None:
        try:
            for item in it:
                if not self._put((True, item)):
                    return
            self._put((True, _END))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer's thread
            self._put((False, e))

    def _put(self, entry: tuple[bool, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> Any:
        if self._stop.is_set():
            raise StopIteration
        try:
            ok, item = self._queue.get(timeout=self.timeout_s if self.timeout_s > 0 else None)
        except queue.Empty:
            self.close()
            raise DataStalledError(
                f"no {self.what} arrived for {self.timeout_s:g} s ({self.setting}): {self.describe()}"
            ) from None
        if not ok:
            self.close()
            raise item
        if item is _END:
            self.close()
            raise StopIteration
        return item

    def close(self) -> None:
        """Stops the background thread after its current batch (it is a daemon: a thread
        blocked inside Ray Data does not keep the process alive)."""
        self._stop.set()


__all__ = ["DataStalledError", "DataWatchdog", "describe_data_wait"]

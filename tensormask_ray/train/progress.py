"""The training progress line rank 0 prints once per logging period (train.log_period)."""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
    """12s, 4m05s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """`line(iteration, metrics)`: iteration, ETA (from the rate since this run or resume
    started), the loss and its terms, images/s; the share of time spent waiting for data when it
    is large enough to matter."""

    DATA_WAIT_SHOWN = 0.05

    def __init__(self, start_iter: int, max_iter: int):
        self.start_iter, self.max_iter = start_iter, max_iter
        self.t0 = time.perf_counter()

    def line(self, it: int, metrics: dict[str, float]) -> str:
        done = it - self.start_iter
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.max_iter - it)
        terms = " ".join(
            f"{k.removeprefix('train/loss_')} {metrics[k]:.3f}"
            for k in sorted(metrics)
            if k.startswith("train/loss_")
        )
        width = len(str(self.max_iter))
        line = (
            f"[train] iter {it:>{width}}/{self.max_iter}  eta {format_duration(eta):>6}  "
            f"loss {metrics['train/loss']:.3f} ({terms})  {metrics['train/images_per_sec']:.1f} img/s"
        )
        wait = metrics.get("train/data_wait_fraction", 0.0)
        if wait >= self.DATA_WAIT_SHOWN:
            line += f"  waiting for data {100 * wait:.0f}%"
        return line


__all__ = ["Progress", "format_duration"]

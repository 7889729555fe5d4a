"""What the per-worker training loop needs from the system that runs it, behind one small interface,
so the same loop (`loop.run_training_loop`) runs under Ray Train on every rank of a cluster and in
one plain Python process with nothing but torch (the GPU check, device tests):

    rank, world_size, device       where this worker sits
    prepare_model(model)           to the device (and DDP when there are several ranks)
    latest_checkpoint()            a folder to resume from, or None
    train_batches(epoch)           this rank's training batches of one epoch
    report(metrics, checkpoint)    every rank, the same number of times; rank 0's checkpoint

`RayTrainContext` (ray_context.py, the only module of the loop's path that imports Ray) is the
Ray Train implementation; `LocalContext` below is the single-process one. Collectives across ranks
(`gather_to_rank0`, `max_across_ranks`) use torch.distributed directly: Ray Train sets up the
process group, and with one process they are the identity.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from ..modeling.checkpoint_file import STATE_FILE
from .checkpoint import CHECKPOINT_PREFIX


class WorkerContext(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model on `device`, wrapped for data-parallel training when world_size > 1."""
        ...

    def latest_checkpoint(self) -> AbstractContextManager[str | None]:
        """Context manager giving a local folder of the checkpoint to resume from, or None."""
        ...

    def train_batches(self, epoch: int) -> Iterable[dict[str, Any]]:
        """This rank's batches of one epoch, on the CPU (see `data.dataset.iter_train_batches`)."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint: str | None, dir_name: str) -> None:
        """Called by every rank at every checkpoint; rank 0 passes the folder it wrote."""
        ...


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's `obj` (picklable) as a list on rank 0, in rank order; None on the others.
    A collective: every rank calls it at the same point."""
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def max_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over ranks (a collective; the identity with one process)."""
    if not _distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """The complete checkpoint folders of a local run directory, oldest first."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


class LocalContext:
    """One process, no Ray: rank 0 of 1 on `device`. Checkpoints are folders
    `<run_dir>/checkpoint_NNNNNNN` on the local disk (the newest `keep` are kept), and a run
    started again in the same `run_dir` resumes from the newest. `batches(epoch)` yields the
    training batches of one epoch (e.g. `data.local.synthetic_batches`). Every report's metrics
    are kept in `reports`."""

    rank = 0
    world_size = 1

    def __init__(
        self,
        device: torch.device | str,
        batches: Callable[[int], Iterable[dict[str, Any]]],
        run_dir: str | Path,
        keep: int = 2,
    ) -> None:
        self.device = torch.device(device)
        self._batches = batches
        self.run_dir = Path(run_dir)
        self.keep = int(keep)
        self.reports: list[dict[str, Any]] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    @contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        folders = checkpoint_folders(self.run_dir)
        yield str(folders[-1]) if folders else None

    def train_batches(self, epoch: int) -> Iterable[dict[str, Any]]:
        return self._batches(epoch)

    def report(self, metrics: dict[str, Any], checkpoint: str | None, dir_name: str) -> None:
        self.reports.append(dict(metrics))
        if checkpoint is None:
            return
        target = self.run_dir / dir_name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(checkpoint, target)
        for old in checkpoint_folders(self.run_dir)[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old)


__all__ = [
    "LocalContext",
    "WorkerContext",
    "checkpoint_folders",
    "gather_to_rank0",
    "max_across_ranks",
]

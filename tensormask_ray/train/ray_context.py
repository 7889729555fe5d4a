"""`WorkerContext` (context.py) for a Ray Train worker: rank, device, DDP, checkpoints and the
dataset shard come from `ray.train`. The only module of the training loop's path that imports Ray.

Resuming: Ray's record of a run's checkpoints can lag its storage. A worker group (or the Tune
trial that owns it) that dies right after a checkpoint was written, as when a node is lost, may
leave that checkpoint unregistered, and the next start would begin from an older one, or from
scratch. The run folder's progress file, which rank 0 writes once a checkpoint is persisted, names
the newest; `latest_checkpoint` takes whichever of the two is newer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from ..config import Config
from ..modeling.checkpoint_file import STATE_FILE
from . import storage
from .checkpoint import PROGRESS_FILE, checkpoint_dir_name, iteration_of


class RayTrainContext:
    def __init__(self, cfg: Config, run_dir: str) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(
                self.device
            )  # collectives of Python objects use the current device
        self._cfg, self._run_dir = cfg, run_dir
        self._shard = None
        node = ray.get_runtime_context().get_node_id()
        print(
            f"[train] rank {self.rank} of {self.world_size} on node {node} ({self.device}, "
            f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})",
            flush=True,
        )

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model)

    @contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        checkpoint = self._newest_in_storage(ray.train.get_checkpoint())
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield folder

    def _newest_in_storage(
        self, registered: ray.train.Checkpoint | None
    ) -> ray.train.Checkpoint | None:
        """`registered` (Ray's latest), or the progress file's checkpoint where that is newer."""
        progress = storage.read_json(storage.join(self._run_dir, PROGRESS_FILE))
        known = iteration_of(registered.path) if registered is not None else None
        if not progress or (known is not None and known >= progress["iteration"]):
            return registered
        path = storage.join(self._run_dir, checkpoint_dir_name(progress["iteration"]))
        if not storage.exists(storage.join(path, STATE_FILE)):
            return registered
        if self.rank == 0:
            print(
                f"[train] checkpoint {path} is newer than Ray's record of the run ({registered and registered.path}): resuming from it",
                flush=True,
            )
        return ray.train.Checkpoint(path)

    def train_batches(self, epoch: int) -> Iterable[dict[str, Any]]:
        from ..data.dataset import iter_train_batches

        if self._shard is None:
            self._shard = ray.train.get_dataset_shard("train")
        return iter_train_batches(
            self._shard, self._cfg.data.batch_size_per_worker, self._cfg, epoch=epoch
        )

    def report(self, metrics: dict[str, Any], checkpoint: str | None, dir_name: str) -> None:
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None,
            checkpoint_dir_name=dir_name,
        )

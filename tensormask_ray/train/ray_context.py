"""`WorkerContext` (context.py) for a Ray Train worker: rank, device, DDP, checkpoints and the
dataset shard come from `ray.train`. The only module of the training loop's path that imports Ray."""

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


class RayTrainContext:
    def __init__(self, cfg: Config) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # collectives of Python objects use the current device
        self._cfg = cfg
        self._shard = None
        node = ray.get_runtime_context().get_node_id()
        print(f"[train] rank {self.rank} of {self.world_size} on node {node} ({self.device})", flush=True)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model)

    @contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield folder

    def train_batches(self, epoch: int) -> Iterable[dict[str, Any]]:
        from ..data.dataset import iter_train_batches

        if self._shard is None:
            self._shard = ray.train.get_dataset_shard("train")
        return iter_train_batches(self._shard, self._cfg.data.batch_size_per_worker, self._cfg, epoch=epoch)

    def report(self, metrics: dict[str, Any], checkpoint: str | None, dir_name: str) -> None:
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(checkpoint) if checkpoint else None,
            checkpoint_dir_name=dir_name,
        )

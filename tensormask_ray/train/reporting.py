"""What each rank of the training loop tells the world: a console/MLflow line every
`train.log_period` iterations (rank 0), and at each checkpoint a checkpoint folder (written by
rank 0, holding every rank's RNG state) and a `report` that every rank makes the same number of
times."""

from __future__ import annotations

import math
import sys
import tempfile
from typing import TYPE_CHECKING, Any

import torch

from ..config import Config
from . import storage
from .checkpoint import PROGRESS_FILE, checkpoint_dir_name, rng_state, save_training_state
from .context import WorkerContext, gather_to_rank0, max_across_ranks
from .progress import Progress

if TYPE_CHECKING:
    from .loop import MetricsLogger, RunSettings, TrainState


class LogWindow:
    """Sums over the iterations since the last log line."""

    def __init__(self) -> None:
        self.wait = self.step = 0.0
        self.images = self.n = 0
        self.losses: dict[str, float] = {}

    def add(self, wait: float, step: float, images: int, losses: dict[str, torch.Tensor]) -> None:
        self.wait += wait
        self.step += step
        self.images += images
        self.n += 1
        for k, v in losses.items():
            self.losses[k] = self.losses.get(k, 0.0) + float(v.detach())

    def metrics(self, lr: float, epoch: int) -> dict[str, float]:
        metrics = {f"train/{k}": v / self.n for k, v in self.losses.items()}
        metrics["train/loss"] = sum(self.losses.values()) / self.n
        metrics["train/lr"] = lr
        metrics["train/images_per_sec"] = self.images / max(self.step, 1e-9)
        metrics["train/step_time"] = self.step / self.n
        metrics["train/data_wait_fraction"] = self.wait / max(self.step, 1e-9)
        metrics["train/epoch"] = epoch
        return metrics


class Reporter:
    """The loop's log lines, checkpoints and reports, and what they are computed from: the log
    window, the training loss since the last report, and the last validation metrics."""

    def __init__(
        self,
        cfg: Config,
        ctx: WorkerContext,
        run: RunSettings,
        logger: MetricsLogger | None,
        start_iteration: int,
    ) -> None:
        self.cfg, self.ctx, self.run, self.logger = cfg, ctx, run, logger
        self.progress = Progress(start_iteration, cfg.solver.max_iter)
        self.window = LogWindow()
        self.loss_sum, self.loss_count = 0.0, 0  # this rank's loss since the last report
        self.last_val: dict[str, float] = {}  # the latest validation metrics (rank 0)
        self.reported: dict[str, Any] = {}  # the metrics of the last report

    def add(
        self,
        wait: float,
        step: float,
        images: int,
        loss: torch.Tensor,
        losses: dict[str, torch.Tensor],
    ) -> None:
        """One iteration: seconds waiting for data and in all, this rank's images, its losses."""
        self.window.add(wait, step, images * self.ctx.world_size, losses)
        self.loss_sum += float(loss.detach())
        self.loss_count += 1

    def log_if_due(self, iteration: int, epoch: int, lr: float) -> None:
        """Rank 0: the window's metrics printed and logged every `train.log_period` iterations
        and at the last one."""
        max_iter = self.cfg.solver.max_iter
        if self.ctx.rank != 0:
            return
        if iteration % self.cfg.train.log_period == 0 or iteration == max_iter:
            metrics = self.window.metrics(lr, epoch)
            print(self.progress.line(iteration, metrics), flush=True)
            if self.logger is not None:
                self.logger.log_metrics(metrics, step=iteration)
            self.window = LogWindow()

    def checkpoint_and_report(self, state: TrainState) -> dict[str, Any]:
        """Write a checkpoint (rank 0, holding every rank's RNG state) and report on every rank.
        The reported train/loss is this rank's training loss averaged over the iterations since
        the last report (what schedulers such as ASHA compare: a single batch's loss is too
        noisy)."""
        cfg, ctx, run = self.cfg, self.ctx, self.run
        iteration, epoch = state.iteration, state.epoch
        metrics: dict[str, Any] = {
            "iteration": iteration,
            "epoch": epoch,
            "train/loss": float(self.loss_sum / max(self.loss_count, 1)),
        }
        memory = peak_memory(ctx.device)
        metrics.update(memory)
        if ctx.rank == 0 and self.logger is not None:
            self.logger.log_metrics(memory, step=iteration)
        metrics.update(self.last_val)
        metrics.setdefault(
            run.checkpoint_metric, -math.inf if cfg.train.checkpoint_mode == "max" else math.inf
        )
        rng_states = gather_to_rank0(rng_state(ctx.device))
        # A deterministic folder name, so the path can travel with the metrics (Tune's results
        # carry no Train checkpoint, and sweeps need to find each trial's checkpoints).
        dir_name = checkpoint_dir_name(iteration)
        metrics["checkpoint_path"] = storage.join(run.run_dir, dir_name)
        if ctx.rank == 0:
            scaler = state.scaler
            with tempfile.TemporaryDirectory() as tmp:
                save_training_state(
                    tmp,
                    state.model,
                    state.optimizer,
                    iteration,
                    epoch,
                    cfg,
                    run.categories,
                    scheduler={
                        "iteration": iteration,
                        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                    },
                    rng_states=rng_states,
                )
                ctx.report(metrics, tmp, dir_name)
            storage.write_json(
                storage.join(run.run_dir, PROGRESS_FILE), {"iteration": iteration, "epoch": epoch}
            )
        else:
            ctx.report(metrics, None, dir_name)
        sys.stdout.flush()
        self.loss_sum, self.loss_count = 0.0, 0
        self.reported = metrics
        return metrics


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident memory (MiB) of the worker that uses the most, and its GPU peak: a collective,
    called by every rank at the same point."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    rss, gpu = max_across_ranks([rss, gpu], device)
    out = {"train/peak_rss_mb_per_worker": float(rss)}
    if device.type == "cuda":
        out["train/peak_gpu_mb_per_worker"] = float(gpu)
    return out


__all__ = ["LogWindow", "Reporter", "peak_memory"]

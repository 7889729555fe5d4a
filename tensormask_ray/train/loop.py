"""The per-worker training loop. It reads like an ordinary PyTorch loop: build, prepare (DDP),
iterate this rank's batches, step, report at each checkpoint.

It is written against `context.WorkerContext`, so one loop serves two callers:
- `train_loop_per_worker(loop_config)`: the TorchTrainer's entry point on every rank of a Ray
  Train run (with `ray_context.RayTrainContext`, the only place that imports Ray);
- `run_training_loop(cfg, LocalContext(...), RunSettings(...))`: one plain process with only
  torch (the GPU check's training run, device tests).

Every rank reports the same number of times (at each checkpoint). Side effects (MLflow, console
progress, checkpoint files) happen on rank 0 only. Validation is handed in by the caller (a
`Validation`, e.g. evaluation.validation.validate_on_shards) and spread over the ranks: each
predicts its slice of the images, rank 0 gathers and scores them. Each checkpoint holds every
rank's RNG state, and each rank of a resumed run restores its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..config import Config, TrainConfig, apply_overrides, from_dict
from ..data.watchdog import DataWatchdog
from . import storage
from .checkpoint import (
    PROGRESS_FILE,
    checkpoint_dir_name,
    load_training_state,
    rng_state,
    save_training_state,
)
from .context import WorkerContext, gather_to_rank0, max_across_ranks
from .progress import Progress
from .schedule import LRSchedule, build_optimizer, set_lr

FAILURE_MARKER = ".failure-injected"
# logged (rank 0) each time the run restarts from a checkpoint
RESUMED_METRIC = "train/resumed_at_iteration"


class InjectedFailure(RuntimeError):
    """Raised once by `train.fail_at_iter` to exercise recovery from a worker failure."""


@dataclass
class RunSettings:
    """What the driver tells every worker about the run, beside the Config."""

    run_dir: str  # storage URI of the run: checkpoints, progress file, failure marker
    checkpoint_metric: str = "train/loss"  # reported with every checkpoint (-inf/inf until known)
    categories: list[dict] = field(default_factory=list)  # stored in each checkpoint
    val_shards: str = ""  # absolute path; empty: no validation
    mlflow_uri: str = ""
    mlflow_run_id: str = ""  # empty: no MLflow logging


class MetricsLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class Validation(Protocol):
    """The periodic validation, handed to the loop by its caller (evaluation.validation's
    `validate_on_shards`; train does not import evaluation). A collective: every rank calls it
    at the same iterations; it returns the val/* metrics on rank 0 and {} on the others."""

    def __call__(
        self,
        model: torch.nn.Module,
        cfg: Config,
        ctx: WorkerContext,
        run: RunSettings,
        iteration: int,
        logger,
    ) -> dict[str, float]: ...


def validation_due(train: TrainConfig, iteration: int, max_iter: int) -> bool:
    """Validation runs at the end, and every `eval_period` iterations when it is > 0."""
    return iteration == max_iter or (train.eval_period > 0 and iteration % train.eval_period == 0)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    images = batch["images"].to(device, non_blocking=True)
    targets = [
        {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
        for t in batch["targets"]
    ]
    return images, targets


class _Window:
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


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point: {"config": Config dict, "run": RunSettings fields, "validation":
    a `Validation` or None}."""
    from .ray_context import RayTrainContext

    cfg: Config = from_dict(loop_config["config"])
    run = RunSettings(**loop_config["run"])
    ctx = RayTrainContext(cfg, run.run_dir)
    logger = None
    if ctx.rank == 0 and run.mlflow_run_id:
        from ..tracking import RunLogger

        logger = RunLogger(run.mlflow_uri, run.mlflow_run_id)
    monitor = _start_system_metrics(cfg, run, ctx.world_size)
    try:
        run_training_loop(cfg, ctx, run, logger, loop_config.get("validation"))
    finally:
        if monitor is not None:
            monitor.finish()


def _start_system_metrics(cfg: Config, run: RunSettings, world_size: int):
    """MLflow's system metrics (CPU, memory, GPU) of this node into the run: one sampler per node
    (its local rank 0), each node's metrics named by node when the run spans several."""
    import ray.train

    from ..tracking import start_system_metrics

    ctx = ray.train.get_context()
    if ctx.get_local_rank() != 0 or not run.mlflow_run_id:
        return None
    node = f"node_{ctx.get_node_rank()}" if ctx.get_local_world_size() < world_size else None
    return start_system_metrics(
        run.mlflow_uri, run.mlflow_run_id, cfg.tracking.system_metrics_interval, node
    )


def run_training_loop(
    cfg: Config,
    ctx: WorkerContext,
    run: RunSettings,
    logger: MetricsLogger | None = None,
    validation: Validation | None = None,
) -> dict[str, Any]:
    """Trains this rank from the latest checkpoint (or from scratch) to `cfg.solver.max_iter`,
    validating on `run.val_shards` with `validation` when both are given. Returns the metrics
    of this rank's last report."""
    if run.val_shards and validation is None:
        raise ValueError(f"validation shards {run.val_shards} but no validation: pass validation=")
    from ..modeling import build_model

    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    _seed_everything(cfg.seed + 1000 * rank)
    with ctx.latest_checkpoint() as folder:
        # model.weights (fine-tuning) initialises a fresh run only; a resumed one has its own weights.
        model = ctx.prepare_model(
            build_model(cfg if folder is None else apply_overrides(cfg, {"model.weights": None}))
        )
        batch_size = cfg.data.batch_size_per_worker
        schedule = LRSchedule.from_config(cfg.solver, batch_size * world)
        optimizer = build_optimizer(model, cfg.solver, schedule.lr_at(0))
        use_amp = cfg.solver.amp != "none" and device.type == "cuda"
        amp_dtype = torch.bfloat16 if cfg.solver.amp == "bf16" else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.solver.amp == "fp16")

        iteration, epoch = 0, 0
        if folder is not None:
            state = load_training_state(folder, model, optimizer, rank=rank, device=device)
            if state.get("scheduler", {}).get("scaler") and scaler.is_enabled():
                scaler.load_state_dict(state["scheduler"]["scaler"])
            iteration, epoch = (
                state["iteration"],
                state["epoch"] + 1,
            )  # a resumed run starts a fresh epoch
            if not state["rng_restored"]:  # a rank the run that wrote the checkpoint did not have
                _seed_everything(cfg.seed + 1000 * rank + iteration)
            if rank == 0:
                print(f"[train] resumed from checkpoint at iteration {iteration}", flush=True)
                if (
                    logger is not None
                ):  # one point per (re)start from a checkpoint: the run's restarts
                    logger.log_metrics({RESUMED_METRIC: iteration}, step=iteration)

    max_iter = cfg.solver.max_iter
    progress = Progress(iteration, max_iter)
    marker = storage.join(run.run_dir, FAILURE_MARKER)
    last_val: dict[str, float] = {}
    reported: dict[str, Any] = {}
    window = _Window()
    since_report = [0.0, 0]  # summed loss and iterations since the last report

    while iteration < max_iter:
        batches = DataWatchdog(iter(ctx.train_batches(epoch)), cfg.train.data_timeout_s)
        while iteration < max_iter:
            t_start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            t_data = time.perf_counter()
            if (
                cfg.train.fail_at_iter
                and iteration == cfg.train.fail_at_iter
                and rank == world - 1
                and not storage.exists(marker)
            ):
                storage.write_text(
                    marker, f"rank {rank} failed on purpose at iteration {iteration}\n"
                )
                raise InjectedFailure(
                    f"train.fail_at_iter: rank {rank} raises at iteration {iteration}"
                )
            lr = schedule.lr_at(iteration)
            set_lr(optimizer, lr)
            images, targets = _to_device(batch, device)
            model.train()
            autocast = (
                torch.autocast(device_type="cuda", dtype=amp_dtype)
                if use_amp
                else contextlib.nullcontext()
            )
            with autocast:
                losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at iteration {iteration}: {{{', '.join(f'{k}: {v.item():.4g}' for k, v in losses.items())}}}"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.solver.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg.solver.grad_clip
                )
            scaler.step(optimizer)
            scaler.update()
            iteration += 1
            window.add(
                t_data - t_start, time.perf_counter() - t_start, images.shape[0] * world, losses
            )
            since_report[0] += float(loss.detach())
            since_report[1] += 1

            if rank == 0 and (iteration % cfg.train.log_period == 0 or iteration == max_iter):
                metrics = window.metrics(lr, epoch)
                print(progress.line(iteration, metrics), flush=True)
                if logger is not None:
                    logger.log_metrics(metrics, step=iteration)
                window = _Window()

            if (
                validation is not None
                and run.val_shards
                and validation_due(cfg.train, iteration, max_iter)
            ):
                last_val = validation(_unwrap(model), cfg, ctx, run, iteration, logger) or last_val

            if iteration % cfg.train.checkpoint_period == 0 or iteration == max_iter:
                mean_loss = since_report[0] / max(since_report[1], 1)
                reported = _checkpoint_and_report(
                    cfg,
                    ctx,
                    run,
                    model,
                    optimizer,
                    scaler,
                    iteration,
                    epoch,
                    mean_loss,
                    last_val,
                    logger,
                )
                since_report = [0.0, 0]
        batches.close()
        epoch += 1
    return reported


def _peak_memory(device: torch.device) -> dict[str, float]:
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


def _checkpoint_and_report(
    cfg, ctx, run, model, optimizer, scaler, iteration, epoch, mean_loss, last_val, logger
) -> dict[str, Any]:
    """Write a checkpoint (rank 0, holding every rank's RNG state) and report on every rank.
    `mean_loss`: this rank's training loss averaged over the iterations since the last report
    (what schedulers such as ASHA compare: a single batch's loss is too noisy)."""
    rank = ctx.rank
    metrics: dict[str, Any] = {
        "iteration": iteration,
        "epoch": epoch,
        "train/loss": float(mean_loss),
    }
    memory = _peak_memory(ctx.device)
    metrics.update(memory)
    if rank == 0 and logger is not None:
        logger.log_metrics(memory, step=iteration)
    metrics.update(last_val)
    metrics.setdefault(
        run.checkpoint_metric, -math.inf if cfg.train.checkpoint_mode == "max" else math.inf
    )
    rng_states = gather_to_rank0(rng_state(ctx.device))
    # A deterministic folder name, so the path can travel with the metrics (Tune's results carry
    # no Train checkpoint, and sweeps need to find each trial's checkpoints).
    dir_name = checkpoint_dir_name(iteration)
    metrics["checkpoint_path"] = storage.join(run.run_dir, dir_name)
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_training_state(
                tmp, model, optimizer, iteration, epoch, cfg, run.categories,
                scheduler={"iteration": iteration, "scaler": scaler.state_dict() if scaler.is_enabled() else {}},
                rng_states=rng_states,
            )  # fmt: skip
            ctx.report(metrics, tmp, dir_name)
        storage.write_json(
            storage.join(run.run_dir, PROGRESS_FILE), {"iteration": iteration, "epoch": epoch}
        )
    else:
        ctx.report(metrics, None, dir_name)
    sys.stdout.flush()
    return metrics


def loop_config(
    cfg: Config, run: RunSettings, validation: Validation | None = None
) -> dict[str, Any]:
    """The `train_loop_config` of the TorchTrainer for `train_loop_per_worker`."""
    config = cfg.to_dict()
    if cfg.model.weights:  # the workers may not run in this directory
        config["model"]["weights"] = os.path.abspath(cfg.model.weights)
    return {"config": config, "run": dataclasses.asdict(run), "validation": validation}


__all__ = [
    "FAILURE_MARKER",
    "PROGRESS_FILE",
    "RESUMED_METRIC",
    "InjectedFailure",
    "MetricsLogger",
    "RunSettings",
    "Validation",
    "loop_config",
    "run_training_loop",
    "train_loop_per_worker",
    "validation_due",
]

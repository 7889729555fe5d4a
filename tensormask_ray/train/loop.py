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

The steps: `_build_state` (model, optimiser, schedule, AMP) and `_resume` into a `TrainState`,
then per batch `_inject_failure_if_due` and `_train_step`; the log lines, checkpoints and reports
are `reporting.Reporter`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..config import Config, TrainConfig, apply_overrides, from_dict
from ..data.watchdog import DataWatchdog
from . import storage
from .checkpoint import load_training_state
from .context import WorkerContext
from .reporting import Reporter
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
    images = batch["images"].to(device, non_blocking=True)  # (N, 3, H, W)
    targets = [
        {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
        for t in batch["targets"]
    ]
    return images, targets


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
    _seed_everything(cfg.seed + 1000 * ctx.rank)
    with ctx.latest_checkpoint() as folder:
        state = _build_state(cfg, ctx, resuming=folder is not None)
        if folder is not None:
            _resume(state, cfg, ctx, folder, logger)

    max_iter = cfg.solver.max_iter
    reporter = Reporter(cfg, ctx, run, logger, state.iteration)
    marker = storage.join(run.run_dir, FAILURE_MARKER)
    while state.iteration < max_iter:
        batches = DataWatchdog(iter(ctx.train_batches(state.epoch)), cfg.train.data_timeout_s)
        while state.iteration < max_iter:
            t_start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            t_data = time.perf_counter()
            _inject_failure_if_due(cfg.train, ctx, state.iteration, marker)
            lr = state.schedule.lr_at(state.iteration)
            loss, losses, num_images = _train_step(state, cfg.solver, batch, ctx.device, lr)
            reporter.add(t_data - t_start, time.perf_counter() - t_start, num_images, loss, losses)
            reporter.log_if_due(state.iteration, state.epoch, lr)
            if (
                validation is not None
                and run.val_shards
                and validation_due(cfg.train, state.iteration, max_iter)
            ):
                val = validation(_unwrap(state.model), cfg, ctx, run, state.iteration, logger)
                reporter.last_val = val or reporter.last_val
            if state.iteration % cfg.train.checkpoint_period == 0 or state.iteration == max_iter:
                reporter.checkpoint_and_report(state)
        batches.close()
        state.epoch += 1
    return reporter.reported


@dataclass
class TrainState:
    """What the loop steps and a checkpoint holds: the model (as `ctx.prepare_model` returned
    it), the optimiser, the LR schedule, the AMP grad scaler, and where the run is."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None  # None: no autocast
    iteration: int = 0
    epoch: int = 0
    device_type: str = "cpu"

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.amp_dtype)


def _build_state(cfg: Config, ctx: WorkerContext, resuming: bool) -> TrainState:
    """The model, optimiser, schedule and scaler of a fresh run at iteration 0."""
    from ..modeling import build_model

    # model.weights (fine-tuning) initialises a fresh run only; a resumed one has its own weights.
    model = ctx.prepare_model(
        build_model(apply_overrides(cfg, {"model.weights": None}) if resuming else cfg)
    )
    schedule = LRSchedule.from_config(cfg.solver, cfg.data.batch_size_per_worker * ctx.world_size)
    optimizer = build_optimizer(model, cfg.solver, schedule.lr_at(0))
    amp_dtype = autocast_dtype(cfg.solver.amp, ctx.device)
    if cfg.solver.amp != "none" and ctx.rank == 0:
        what = "float32 (see the warning)" if amp_dtype is None else f"{amp_dtype} autocast"
        print(f"[train] solver.amp={cfg.solver.amp}: {what} on {ctx.device.type}", flush=True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return TrainState(model, optimizer, schedule, scaler, amp_dtype, device_type=ctx.device.type)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `solver.amp` on `device`, None for float32. bf16 on a GPU, or on a
    CPU with bf16 instructions (`cpu_has_bf16`: oneDNN's bf16 convolutions; on this project's
    2-core AVX512-BF16 machine a demo step takes 0.65x its float32 time); a CPU without them
    would emulate bf16, slower than float32, so it trains in float32 with a warning. fp16 on a
    GPU only (a CPU trains in float32, with a warning)."""
    if amp == "none":
        return None
    if device.type not in ("cpu", "cuda"):  # torch.autocast takes neither e.g. "meta" nor "mps"
        _warn_float32(f"solver.amp={amp} runs on a GPU or a CPU, not on {device.type}")
        return None
    if device.type == "cpu":
        if amp == "fp16":
            _warn_float32("solver.amp=fp16 runs on a GPU only (bf16 is the CPU's mixed precision)")
            return None
        if not cpu_has_bf16():
            _warn_float32("solver.amp=bf16: this CPU has no bf16 instructions (avx512_bf16, amx)")
            return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _warn_float32(why: str) -> None:
    warnings.warn(f"{why}: this run trains in float32", stacklevel=3)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (x86 AVX512-BF16 or AMX-BF16, Arm BF16), read from
    /proc/cpuinfo's flags; False where that file does not exist."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _resume(
    state: TrainState, cfg: Config, ctx: WorkerContext, folder, logger: MetricsLogger | None
) -> None:
    """Loads the checkpoint in `folder` into `state` (this rank's RNG state included)."""
    rank = ctx.rank
    saved = load_training_state(folder, state.model, state.optimizer, rank=rank, device=ctx.device)
    if saved.get("scheduler", {}).get("scaler") and state.scaler.is_enabled():
        state.scaler.load_state_dict(saved["scheduler"]["scaler"])
    # a resumed run starts a fresh epoch
    state.iteration, state.epoch = saved["iteration"], saved["epoch"] + 1
    if not saved["rng_restored"]:  # a rank the run that wrote the checkpoint did not have
        _seed_everything(cfg.seed + 1000 * rank + state.iteration)
    if rank == 0:
        print(f"[train] resumed from checkpoint at iteration {state.iteration}", flush=True)
        if logger is not None:  # one point per (re)start from a checkpoint: the run's restarts
            logger.log_metrics({RESUMED_METRIC: state.iteration}, step=state.iteration)


def _inject_failure_if_due(train: TrainConfig, ctx: WorkerContext, iteration: int, marker: str):
    """`train.fail_at_iter`: the last rank raises once at that iteration (the marker file
    remembers it did, so the restarted run goes on)."""
    rank = ctx.rank
    if (
        train.fail_at_iter
        and iteration == train.fail_at_iter
        and rank == ctx.world_size - 1
        and not storage.exists(marker)
    ):
        storage.write_text(marker, f"rank {rank} failed on purpose at iteration {iteration}\n")
        raise InjectedFailure(f"train.fail_at_iter: rank {rank} raises at iteration {iteration}")


def _train_step(
    state: TrainState, solver, batch: dict, device: torch.device, lr: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """One optimiser step at learning rate `lr`: (total loss, the losses, images in the batch).
    A loss that is not finite raises FloatingPointError naming each term."""
    set_lr(state.optimizer, lr)
    images, targets = _to_device(batch, device)  # (N, 3, H, W)
    state.model.train()
    with state.autocast():
        losses = state.model(images, targets)
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        terms = ", ".join(f"{k}: {v.item():.4g}" for k, v in losses.items())
        raise FloatingPointError(
            f"loss is {loss.item()} at iteration {state.iteration}: {{{terms}}}"
        )
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if solver.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(
            [p for p in state.model.parameters() if p.requires_grad], solver.grad_clip
        )
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.iteration += 1
    return loss, losses, images.shape[0]


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
    "RESUMED_METRIC",
    "InjectedFailure",
    "MetricsLogger",
    "RunSettings",
    "TrainState",
    "Validation",
    "loop_config",
    "run_training_loop",
    "train_loop_per_worker",
    "validation_due",
]

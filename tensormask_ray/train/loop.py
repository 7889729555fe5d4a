"""The per-worker training loop that Ray Train runs on every rank. It reads like an ordinary
PyTorch loop: build, prepare_model (DDP), iterate this rank's shard of the data, step,
`ray.train.report(metrics, checkpoint)`.

Every rank reports the same number of times (at each checkpoint). Side effects (MLflow, console
progress, checkpoint files) happen on rank 0 only.
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
import time

import numpy as np
import torch

from ..config import Config, from_dict
from . import storage
from .checkpoint import load_training_state, save_training_state
from .schedule import LRSchedule, build_optimizer, set_lr

FAILURE_MARKER = ".failure-injected"
PROGRESS_FILE = "progress.json"  # {"iteration", "epoch"} of the latest checkpoint (rank 0)


class InjectedFailure(RuntimeError):
    """Raised once by `train.fail_at_iter` to exercise recovery from a worker failure."""


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    images = batch["images"].to(device, non_blocking=True)
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in batch["targets"]]
    return images, targets


class Progress:
    """Rank-0 console line: iteration, ETA, losses, images/s, data wait."""

    def __init__(self, start_iter: int, max_iter: int):
        self.start_iter, self.max_iter = start_iter, max_iter
        self.t0 = time.perf_counter()

    def line(self, it: int, metrics: dict[str, float]) -> str:
        done = it - self.start_iter
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.max_iter - it)
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta))
        losses = "  ".join(f"{k.split('/')[-1]} {metrics[k]:.3f}" for k in sorted(metrics) if k.startswith("train/loss_"))
        return (
            f"[train] iter {it}/{self.max_iter}  eta {eta_s}  loss {metrics['train/loss']:.3f} ({losses})  "
            f"lr {metrics['train/lr']:.5f}  {metrics['train/images_per_sec']:.1f} img/s  "
            f"data-wait {100 * metrics['train/data_wait_fraction']:.1f}%"
        )


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from ..data.dataset import iter_train_batches
    from ..modeling import build_model
    from ..tracking import RunLogger, start_system_metrics

    cfg: Config = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _seed_everything(cfg.seed + 1000 * rank)
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")

    model = build_model(cfg)
    model = ray.train.torch.prepare_model(model)
    batch_size = cfg.data.batch_size_per_worker
    schedule = LRSchedule.from_config(cfg.solver, batch_size * world)
    optimizer = build_optimizer(model, cfg.solver, schedule.lr_at(0))
    use_amp = cfg.train.use_gpu and cfg.solver.amp != "none" and torch.cuda.is_available()
    amp_dtype = torch.bfloat16 if cfg.solver.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.solver.amp == "fp16")

    iteration, epoch = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_training_state(folder, model, optimizer)
            if state.get("scheduler", {}).get("scaler") and scaler.is_enabled():
                scaler.load_state_dict(state["scheduler"]["scaler"])
        iteration, epoch = state["iteration"], state["epoch"] + 1  # a resumed run starts a fresh epoch
        if rank == 0:
            print(f"[train] resumed from checkpoint at iteration {iteration}", flush=True)

    logger = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        logger = RunLogger(loop_config["mlflow_uri"], loop_config["mlflow_run_id"])
    monitor = None  # MLflow's system metrics: one sampler per node
    if ctx.get_local_rank() == 0 and loop_config.get("mlflow_run_id"):
        node = f"node_{ctx.get_node_rank()}" if ctx.get_local_world_size() < world else None
        monitor = start_system_metrics(loop_config["mlflow_uri"], loop_config["mlflow_run_id"], cfg.tracking.system_metrics_interval, node)
    shard = ray.train.get_dataset_shard("train")
    max_iter = cfg.solver.max_iter
    progress = Progress(iteration, max_iter)
    categories = loop_config.get("categories", [])
    marker = storage.join(loop_config["run_dir"], FAILURE_MARKER)
    last_val: dict[str, float] = {}
    window = {"wait": 0.0, "step": 0.0, "images": 0, "n": 0, "losses": {}}
    since_report = [0.0, 0]  # summed loss and iterations since the last report

    while iteration < max_iter:
        batches = iter(iter_train_batches(shard, batch_size, cfg, epoch=epoch))
        while iteration < max_iter:
            t_start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            t_data = time.perf_counter()
            if cfg.train.fail_at_iter and iteration == cfg.train.fail_at_iter and rank == world - 1 and not storage.exists(marker):
                storage.write_text(marker, f"rank {rank} failed on purpose at iteration {iteration}\n")
                raise InjectedFailure(f"train.fail_at_iter: rank {rank} raises at iteration {iteration}")
            lr = schedule.lr_at(iteration)
            set_lr(optimizer, lr)
            images, targets = _to_device(batch, device)
            model.train()
            with torch.autocast(device_type="cuda", dtype=amp_dtype, enabled=use_amp):
                losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at iteration {iteration}: {{{', '.join(f'{k}: {v.item():.4g}' for k, v in losses.items())}}}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.solver.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.solver.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            iteration += 1
            t_end = time.perf_counter()

            window["wait"] += t_data - t_start
            window["step"] += t_end - t_start
            window["images"] += images.shape[0] * world
            window["n"] += 1
            for k, v in losses.items():
                window["losses"][k] = window["losses"].get(k, 0.0) + float(v.detach())
            since_report[0] += float(loss.detach())
            since_report[1] += 1

            if rank == 0 and (iteration % cfg.train.log_period == 0 or iteration == max_iter):
                n = window["n"]
                metrics = {f"train/{k}": v / n for k, v in window["losses"].items()}
                metrics["train/loss"] = sum(window["losses"].values()) / n
                metrics["train/lr"] = lr
                metrics["train/images_per_sec"] = window["images"] / max(window["step"], 1e-9)
                metrics["train/step_time"] = window["step"] / n
                metrics["train/data_wait_fraction"] = window["wait"] / max(window["step"], 1e-9)
                metrics["train/epoch"] = epoch
                print(progress.line(iteration, metrics), flush=True)
                if logger is not None:
                    logger.log_metrics(metrics, step=iteration)
                window = {"wait": 0.0, "step": 0.0, "images": 0, "n": 0, "losses": {}}

            if iteration % cfg.train.checkpoint_period == 0 or iteration == max_iter:
                last_val = _checkpoint_and_report(
                    cfg, model, optimizer, scaler, iteration, epoch, rank, categories, logger, loop_config, last_val, since_report[0] / max(since_report[1], 1)
                )
                since_report = [0.0, 0]
        epoch += 1
    if monitor is not None:
        monitor.finish()


def _peak_memory(cfg: Config) -> dict[str, float]:
    """Peak resident memory (MiB) of the worker that uses the most, and its GPU peak: a collective,
    called by every rank at the same point."""
    import resource

    import torch.distributed as dist

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64)
    gpu = torch.tensor([torch.cuda.max_memory_allocated() / 2**20 if cfg.train.use_gpu else 0.0], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        both = torch.cat([peak, gpu])
        if cfg.train.use_gpu:
            both = both.cuda()
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        peak, gpu = both[:1].cpu(), both[1:].cpu()
    out = {"train/peak_rss_mb_per_worker": float(peak)}
    if cfg.train.use_gpu:
        out["train/peak_gpu_mb_per_worker"] = float(gpu)
    return out


def _checkpoint_and_report(cfg, model, optimizer, scaler, iteration, epoch, rank, categories, logger, loop_config, last_val, mean_loss):
    """Evaluate (rank 0, when due), write a checkpoint (rank 0), and report on every rank.
    `mean_loss`: this rank's training loss averaged over the iterations since the last report
    (what schedulers such as ASHA compare: a single batch's loss is too noisy)."""
    import ray.train

    metrics: dict[str, float] = {"iteration": iteration, "epoch": epoch, "train/loss": float(mean_loss)}
    memory = _peak_memory(cfg)
    metrics.update(memory)
    if rank == 0 and logger is not None:
        logger.log_metrics(memory, step=iteration)
    due = cfg.train.eval_period == 0 or iteration % cfg.train.eval_period == 0 or iteration == cfg.solver.max_iter
    if rank == 0 and loop_config.get("val_shards") and due:
        from ..evaluation.evaluator import evaluate_model, overlay_images

        inner = model.module if hasattr(model, "module") else model
        t0 = time.perf_counter()
        ap = evaluate_model(inner, loop_config["val_shards"], cfg, max_images=cfg.data.max_val_images)
        last_val = {f"val/{k}": v for k, v in ap.items()}
        print(
            f"[train] validation at iteration {iteration}: mask AP {100 * ap['segm/AP']:.1f}  "
            f"AP50 {100 * ap['segm/AP50']:.1f}  box AP {100 * ap['bbox/AP']:.1f}  ({time.perf_counter() - t0:.1f}s)",
            flush=True,
        )
        if logger is not None:
            logger.log_metrics(last_val, step=iteration)
            for name, overlay in overlay_images(inner, loop_config["val_shards"], cfg, cfg.tracking.overlay_images, cfg.data.max_val_images):
                logger.log_image(overlay, key=f"val/overlay/{name}", step=iteration)
    metrics.update(last_val)
    metric_key = loop_config["checkpoint_metric"]
    metrics.setdefault(metric_key, -math.inf if cfg.train.checkpoint_mode == "max" else math.inf)
    # A deterministic folder name, so the path can travel with the metrics (Tune's results carry
    # no Train checkpoint, and sweeps need to find each trial's checkpoints).
    dir_name = f"checkpoint_{iteration:07d}"
    metrics["checkpoint_path"] = storage.join(loop_config["run_dir"], dir_name)
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_training_state(
                tmp, model, optimizer, iteration, epoch, cfg, categories,
                scheduler={"iteration": iteration, "scaler": scaler.state_dict() if scaler.is_enabled() else {}},
            )  # fmt: skip
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=dir_name)
        storage.write_json(storage.join(loop_config["run_dir"], PROGRESS_FILE), {"iteration": iteration, "epoch": epoch})
    else:
        ray.train.report(metrics, checkpoint_dir_name=dir_name)
    sys.stdout.flush()
    return last_val

"""Periodic validation during training: COCO AP on the validation shards, spread over the ranks.

The training loop does not import this layer: its callers hand `validate_on_shards` to it (a
`train.loop.Validation`), so `train` stays below `evaluation` (README, Layout)."""

from __future__ import annotations

import time

import torch

from ..config import Config
from ..train.context import WorkerContext, gather_to_rank0
from ..train.loop import RunSettings
from .evaluator import overlay_images, predict_shards, score_predictions


def validate_on_shards(
    model: torch.nn.Module,
    cfg: Config,
    ctx: WorkerContext,
    run: RunSettings,
    iteration: int,
    logger,
) -> dict[str, float]:
    """COCO AP on `run.val_shards`: every rank predicts its slice of the images (image i on rank
    i % world_size), rank 0 gathers the results and scores them. A collective; returns the val/*
    metrics on rank 0 and {} on the others. `model` is the bare module (not the DDP wrapper)."""
    t0 = time.perf_counter()
    mine = predict_shards(
        model, run.val_shards, cfg, cfg.data.max_val_images, ctx.rank, ctx.world_size
    )
    gathered = gather_to_rank0(mine)
    if gathered is None:
        return {}
    results = [r for part, _ in gathered for r in part]
    image_ids = [i for _, ids in gathered for i in ids]
    ap = score_predictions(run.val_shards, results, image_ids)
    print(
        f"[train] validation at iteration {iteration} ({len(image_ids)} images on {ctx.world_size} "
        f"rank{'s' if ctx.world_size > 1 else ''}): mask AP {100 * ap['segm/AP']:.1f}  AP50 {100 * ap['segm/AP50']:.1f}  "
        f"box AP {100 * ap['bbox/AP']:.1f}  ({time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    val = {f"val/{k}": v for k, v in ap.items()}
    if logger is not None:
        logger.log_metrics(val, step=iteration)
        for name, overlay in overlay_images(
            model, run.val_shards, cfg, cfg.tracking.overlay_images, cfg.data.max_val_images
        ):
            logger.log_image(overlay, key=f"val/overlay/{name}", step=iteration)
    return val


__all__ = ["validate_on_shards"]

"""Small checkpoints for the inference tests, written the way training writes them
(`save_training_state`): a cpu-small model made tiny, random weights, no training. Its AP is ~0,
which is all the plumbing tests need; the head's weights are drawn wider than at initialisation
so that scores and mask logits are spread out (no detection or pixel sits on a threshold)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tensormask_ray.config import load_config
from tensormask_ray.modeling import build_model
from tensormask_ray.train.checkpoint import save_training_state

# About 40 ms per 160 px image on one core.
TINY = {
    "model.fpn_channels": 32,
    "model.cls_channels": 32,
    "model.box_channels": 32,
    "model.mask_channels": 32,
    "model.tower_depth": 1,
    "input.min_size_test": 96,
    "input.max_size_test": 128,
    "inference.score_thresh": 0.0,
    "inference.detections_per_image": 10,
}


def tiny_config(num_classes: int, **overrides):
    return load_config(
        preset="cpu-small", overrides={**TINY, "model.num_classes": num_classes, **overrides}
    )


def make_checkpoint(
    folder: Path, categories: list[dict], seed: int = 0, iteration: int = 7, **overrides
) -> Path:
    """A checkpoint folder (holding state.pt) of a tiny model for `categories`."""
    cfg = tiny_config(len(categories), **overrides)
    torch.manual_seed(seed)
    model = build_model(cfg)
    for module in model.head.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    save_training_state(folder, model, optimizer, iteration, 0, cfg, categories=categories)
    return Path(folder)

"""The paper's optimisation schedule (§4.2): SGD (AdamW as an option), base LR 0.02 at a global batch of 16 scaled
linearly with the actual global batch, linear warm-up, step decay.

The learning rate is a pure function of the iteration, so a run resumed from a checkpoint (after a
worker failure or `--resume`) continues the schedule exactly where it was.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from ..config import SolverConfig


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float  # already scaled to the global batch
    warmup_iters: int
    warmup_factor: float
    steps: tuple[int, ...]
    gamma: float

    @classmethod
    def from_config(cls, solver: SolverConfig, global_batch: int) -> LRSchedule:
        return cls(
            base_lr=scaled_lr(solver, global_batch),
            warmup_iters=solver.warmup_iters,
            warmup_factor=solver.warmup_factor,
            steps=tuple(solver.steps),
            gamma=solver.gamma,
        )

    def lr_at(self, iteration: int) -> float:
        """LR used for the step that takes the model from `iteration` to `iteration + 1`."""
        lr = self.base_lr * self.gamma ** bisect.bisect_right(self.steps, iteration)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            lr *= self.warmup_factor * (1 - alpha) + alpha
        return lr


def scaled_lr(solver: SolverConfig, global_batch: int) -> float:
    """Linear scaling rule: base_lr x global_batch / reference_batch_size."""
    return solver.base_lr * global_batch / solver.reference_batch_size


def build_optimizer(
    model: torch.nn.Module, solver: SolverConfig, lr: float
) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # torch's fused kernels (CPU and CUDA): one pass over all parameters. On a 2-core CPU an
    # AdamW step of the demo's 12M parameters takes 11 ms fused vs 60 ms in torch's default
    # per-parameter loop (SGD: 7 vs 16 ms).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if solver.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, weight_decay=solver.weight_decay, fused=fused or None
        )
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=solver.momentum,
        weight_decay=solver.weight_decay,
        fused=fused or None,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

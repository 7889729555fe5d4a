"""The three task losses of §4.2. Each returns a SUM; the model normalises by the number of
positive windows, as RetinaNet and Detectron2's TensorMask do."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss_star(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float = 3.0, alpha: float = 0.3
) -> torch.Tensor:
    """FL* (RetinaNet appendix A): -log(sigmoid(gamma * x_t)) / gamma with x_t = x for positives and
    -x for negatives, weighted by alpha (positives) / 1 - alpha (negatives). logits, targets: (R, K),
    targets in {0, 1}. Returns the sum over all entries."""
    targets = targets.to(logits.dtype)
    shifted = gamma * logits * (2 * targets - 1)
    loss = -F.logsigmoid(shifted) / gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.sum()


def box_l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Parameter-free l1 on (F, 4) box deltas, summed."""
    return (pred - target).abs().sum()


def mask_bce_loss(
    pred_logits: torch.Tensor, target: torch.Tensor, fg_weight: float = 1.5
) -> torch.Tensor:
    """Per-pixel BCE with foreground pixels weighted `fg_weight`, averaged over each window's pixels
    and summed over windows. pred_logits, target: (P, Vo, Uo)."""
    if pred_logits.numel() == 0:
        return pred_logits.sum()
    pos_weight = torch.tensor(fg_weight, dtype=pred_logits.dtype, device=pred_logits.device)
    per_pixel = F.binary_cross_entropy_with_logits(
        pred_logits, target.to(pred_logits.dtype), pos_weight=pos_weight, reduction="none"
    )
    return per_pixel.flatten(1).mean(dim=1).sum()

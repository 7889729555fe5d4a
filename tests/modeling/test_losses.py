import math

import torch
import torch.nn.functional as F

from tensormask_ray.modeling.losses import box_l1_loss, focal_loss_star, mask_bce_loss

LOG2 = math.log(2.0)


def test_focal_loss_star_known_values():
    zero = torch.zeros(1, 1)
    # -log(sigmoid(0)) / gamma, weighted alpha (positive) or 1 - alpha (negative)
    assert torch.isclose(
        focal_loss_star(zero, torch.ones(1, 1), 3.0, 0.3), torch.tensor(0.3 * LOG2 / 3)
    )
    assert torch.isclose(
        focal_loss_star(zero, torch.zeros(1, 1), 3.0, 0.3), torch.tensor(0.7 * LOG2 / 3)
    )
    # confident and right -> ~0; confident and wrong -> ~ weight * |x|
    assert focal_loss_star(torch.tensor([[20.0]]), torch.ones(1, 1)) < 1e-20
    assert torch.isclose(
        focal_loss_star(torch.tensor([[20.0]]), torch.zeros(1, 1)),
        torch.tensor(0.7 * 20.0),
        rtol=1e-4,
    )


def test_focal_loss_star_is_a_sharpened_class_weighted_cross_entropy():
    """RetinaNet appendix A: FL* is the cross-entropy of gamma * x, divided by gamma, weighted alpha
    / 1 - alpha. Checked against torch's own binary cross-entropy (another implementation), not
    against a restatement of ours."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=g, dtype=torch.float64) * 3
    t = (torch.rand(50, 7, generator=g) < 0.2).double()
    weight = torch.where(t > 0, 0.3, 0.7).double()
    bce = F.binary_cross_entropy_with_logits(3 * x, t, weight=weight, reduction="sum") / 3
    assert torch.allclose(focal_loss_star(x, t, 3.0, 0.3), bce)
    # gamma 1 and no class weighting (alpha < 0): plain binary cross-entropy
    assert torch.allclose(
        focal_loss_star(x, t, 1.0, -1.0), F.binary_cross_entropy_with_logits(x, t, reduction="sum")
    )
    # the point of gamma: well-classified entries (x_t = 3) weigh less than with plain BCE
    easy = torch.tensor([[3.0]], dtype=torch.float64)
    assert focal_loss_star(
        easy, torch.ones(1, 1), 3.0, -1.0
    ) < 0.01 * F.binary_cross_entropy_with_logits(easy, torch.ones(1, 1, dtype=torch.float64))


def test_mask_bce_weights_foreground_and_averages_pixels_then_sums_windows():
    logits = torch.zeros(2, 4, 4)
    target = torch.zeros(2, 4, 4)
    target[0] = 1  # window 0 all foreground, window 1 all background
    loss = mask_bce_loss(logits, target, 1.5)
    assert torch.isclose(loss, torch.tensor(1.5 * LOG2 + LOG2))
    half = torch.zeros(1, 4, 4)
    half[0, :2] = 1
    assert torch.isclose(
        mask_bce_loss(torch.zeros(1, 4, 4), half, 1.5), torch.tensor((1.5 * LOG2 + LOG2) / 2)
    )
    x = torch.randn(3, 5, 6)
    t = (torch.rand(3, 5, 6) > 0.5).float()
    w = 1 + 0.5 * t
    ref = (
        F.binary_cross_entropy_with_logits(x, t, weight=w, reduction="none").mean(dim=(1, 2))
    ).sum()
    assert torch.allclose(mask_bce_loss(x, t, 1.5), ref)


def test_box_l1():
    assert box_l1_loss(torch.tensor([[1.0, -2.0, 0.5, 0.0]]), torch.zeros(1, 4)) == 3.5

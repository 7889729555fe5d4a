"""The paper's schedule (§4.2) outside Ray: linear scaling with the global batch, linear warm-up,
step decay, and an LR that is a function of the iteration alone (so a resumed run continues it)."""

from __future__ import annotations

import pytest
import torch

from tensormask_ray.config import SolverConfig
from tensormask_ray.train.schedule import LRSchedule, build_optimizer, scaled_lr, set_lr


def test_the_paper_schedule_at_its_turning_points():
    solver = SolverConfig()  # base 0.02 at batch 16, warm-up 1000 from 0.001, steps 60k and 80k
    s = LRSchedule.from_config(solver, global_batch=8)
    assert s.base_lr == pytest.approx(0.01) == scaled_lr(solver, 8)  # linear scaling rule
    assert s.lr_at(0) == pytest.approx(0.01 * 0.001)
    assert s.lr_at(500) == pytest.approx(0.01 * (0.001 * 0.5 + 0.5))  # half-way up the ramp
    assert s.lr_at(1000) == pytest.approx(0.01)
    assert s.lr_at(59_999) == pytest.approx(0.01)
    assert s.lr_at(60_000) == pytest.approx(0.001)  # the step at 60k already uses the decayed LR
    assert s.lr_at(80_000) == pytest.approx(0.0001)
    assert s.lr_at(89_999) == pytest.approx(0.0001)


def test_warm_up_rises_and_decay_falls_monotonically():
    s = LRSchedule(base_lr=1.0, warmup_iters=10, warmup_factor=0.1, steps=(5, 20), gamma=0.5)
    lrs = [s.lr_at(i) for i in range(30)]
    # a step inside the warm-up scales the ramp: warm-up factor times the decayed LR
    assert lrs[5] == pytest.approx(0.5 * (0.1 * 0.5 + 0.5))
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:5]))
    assert lrs[10:20] == [0.5] * 10 and lrs[20:] == [0.25] * 10
    # a pure function of the iteration: a "resumed" schedule gives the same values
    assert [LRSchedule(1.0, 10, 0.1, (5, 20), 0.5).lr_at(i) for i in range(30)] == lrs


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_takes_the_trainable_parameters_and_set_lr_sets_every_group(name, kind):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)  # frozen, as the first backbone stages
    opt = build_optimizer(model, SolverConfig(optimizer=name, weight_decay=0.01), lr=0.5)
    assert isinstance(opt, kind)
    params = [p for group in opt.param_groups for p in group["params"]]
    assert len(params) == 3 and all(p.requires_grad for p in params)
    assert opt.param_groups[0]["weight_decay"] == 0.01
    set_lr(opt, 0.125)
    assert [g["lr"] for g in opt.param_groups] == [0.125] * len(opt.param_groups)


@pytest.mark.parametrize(
    "name, reference",
    [
        (
            "sgd",
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=False),
        ),
        ("adamw", lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=1e-4, foreach=False)),
    ],
)
def test_the_fused_optimizer_steps_as_torchs_per_parameter_loop(name, reference):
    """build_optimizer uses torch's fused kernels (one pass over all parameters, 5x faster on
    the CPU); five steps must move the weights as the plain per-parameter implementation does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 2, 1))
    twin = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    fused = build_optimizer(model, SolverConfig(optimizer=name, weight_decay=1e-4), lr=0.1)
    assert fused.defaults["fused"], "build_optimizer should take torch's fused kernels"
    plain = reference(twin)
    x = torch.randn(2, 3, 9, 9)
    for _ in range(5):
        for params, opt in ((list(model.parameters()), fused), (twin, plain)):
            opt.zero_grad()
            out = torch.nn.functional.conv2d(x, params[0], params[1])
            out = torch.nn.functional.conv2d(out, params[2], params[3])
            out.square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

"""Every shipped sweep spec builds: each distinct model of its trials (the spec's full configuration
with each listed value of its search space; trials that differ only outside `model.*` share one)
is built and runs one training forward on a small image. The paper-scale specs (sweeps/*.yaml) ask for GPUs and the paper's model and schedule; ASHA
compares fresh validation results at every rung."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from tensormask_ray.config import apply_overrides
from tensormask_ray.modeling import build_model
from tensormask_ray.tune.spec import base_config, load_spec, space_of, trial_overrides

ROOT = Path(__file__).resolve().parents[2]
PAPER = sorted((ROOT / "sweeps").glob("*.yaml"))
CPU = sorted((ROOT / "sweeps" / "cpu").glob("*.yaml"))


def trial_configs(spec, cfg):
    """The config of every combination of the listed values (ranges at their low end)."""
    keys, choices = [], []
    for key, space in spec.search.items():
        kind, values = space_of(key, space, spec.source)
        keys.append(key)
        choices.append(values if kind in ("choice", "grid") else [values[0]])
    for combo in itertools.product(*choices):
        yield apply_overrides(cfg, trial_overrides(dict(zip(keys, combo)))).validate()


def one_forward(cfg) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(cfg).train()
    h, w = 64, 96  # P7 (stride 128) is still one cell
    masks = torch.zeros(1, h, w, dtype=torch.uint8)
    masks[0, 8:50, 20:70] = 1
    targets = [
        {
            "boxes": torch.tensor([[20.0, 8.0, 70.0, 50.0]]),
            "labels": torch.tensor([1]),
            "masks": masks,
            "iscrowd": torch.tensor([False]),
        }
    ]
    with torch.no_grad():
        losses = model(torch.randn(1, 3, h, w), targets)
    return {k: float(v) for k, v in losses.items()}


@pytest.mark.parametrize("path", PAPER + CPU, ids=lambda p: str(p.relative_to(ROOT / "sweeps")))
def test_each_model_of_each_spec_builds_and_runs_a_forward(path):
    spec = load_spec(path)
    cfg = base_config(spec, {"model.num_classes": 4})  # the data's class count comes with the data
    seen = set()
    for trial in trial_configs(spec, cfg):
        model_key = repr({k: v for k, v in trial.flat().items() if k.startswith("model.")})
        if model_key in seen:
            continue
        seen.add(model_key)
        losses = one_forward(trial)
        assert set(losses) == {"loss_cls", "loss_box", "loss_mask"} and all(
            math.isfinite(v) for v in losses.values()
        ), (path.name, losses)
    assert seen


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_scale_specs_ask_for_gpus_and_the_papers_model(path):
    spec = load_spec(path)
    cfg = base_config(spec)
    assert spec.resources.gpus_per_worker >= 1 and spec.resources.workers >= 1
    assert cfg.model.backbone.depth == 50 and (cfg.model.min_level, cfg.model.max_level) == (2, 7)
    assert (
        cfg.model.backbone.norm == "FrozenBN"
        and cfg.solver.optimizer == "sgd"
        and cfg.solver.base_lr == 0.02
    )
    assert cfg.input.min_size_train == [640, 800] and cfg.input.min_size_test == 800
    assert cfg.solver.max_iter == 90000 and cfg.solver.steps == [
        60000,
        80000,
    ]  # 1x: 1/6 of the paper's 6x
    assert spec.metric == "val/segm/AP"


@pytest.mark.parametrize("path", PAPER + CPU, ids=lambda p: str(p.relative_to(ROOT / "sweeps")))
def test_asha_rungs_fall_on_checkpoints_with_fresh_validation(path):
    spec = load_spec(path)
    if spec.scheduler.type != "asha":
        return
    cfg = base_config(spec)
    max_t = spec.scheduler.max_t or cfg.solver.max_iter
    rungs = []
    r = spec.scheduler.grace_period
    while r < max_t:
        rungs.append(int(r))
        r *= spec.scheduler.reduction_factor
    for rung in rungs:
        assert rung % cfg.train.checkpoint_period == 0, (
            path.name,
            rung,
        )  # reports happen at checkpoints
        if spec.metric.startswith("val/"):
            assert cfg.train.eval_period and rung % cfg.train.eval_period == 0, (path.name, rung)

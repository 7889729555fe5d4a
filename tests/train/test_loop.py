"""The per-worker training loop's pieces that need no Ray: each rank's RNG state in a checkpoint,
validation spread over ranks, and when validation runs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tensormask_ray.config import Config, TrainConfig
from tensormask_ray.data.manifest import read_manifest
from tensormask_ray.evaluation.evaluator import evaluate_model, predict_shards, score_predictions
from tensormask_ray.train.checkpoint import (
    load_model_for_inference,
    load_training_state,
    rng_state,
    save_training_state,
)
from tensormask_ray.train.loop import (
    RunSettings,
    autocast_dtype,
    run_training_loop,
    validation_due,
)

from ..evaluation.checkpoints import make_checkpoint
from ..fresh_process import not_loaded, run_python


def test_the_training_driver_imports_neither_the_network_nor_torchvision():
    """Ray Train's controller and a sweep's trial actor import train.loop (to unpickle the loop)
    and never build a model: the network and torchvision load in the workers only."""
    code = (
        "import tensormask_ray.train.loop, tensormask_ray.train.trainer\n"
        + not_loaded("torchvision", "tensormask_ray.modeling.tensormask")
        + "from tensormask_ray.modeling import build_model, TensorMask\n"
        "from tensormask_ray.modeling.tensormask import build_model as direct\n"
        "assert build_model is direct and isinstance(TensorMask, type)\n"
        "try:\n"
        "    from tensormask_ray.modeling import no_such_name  # noqa: F401\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('an unknown name imported')\n"
    )
    run_python(code)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _draws() -> tuple:
    return (torch.rand(3).tolist(), float(np.random.rand()), random.random())


def test_each_rank_resumes_its_own_random_stream(tmp_path):
    states, expected = [], []
    for rank in range(2):  # what each rank's RNG holds when the checkpoint is written
        _seed(1000 * rank)
        _draws()
        states.append(rng_state())
        expected.append(_draws())
    assert expected[0] != expected[1]
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_training_state(tmp_path, model, optimizer, 7, 0, Config(), rng_states=states)
    for rank in (1, 0):
        _seed(99)
        state = load_training_state(tmp_path, model, optimizer, rank=rank)
        assert state["rng_restored"] and _draws() == expected[rank], rank
    # a rank the writing run did not have (the run grew): nothing restored, the loop seeds it
    assert not load_training_state(tmp_path, model, optimizer, rank=2)["rng_restored"]


def test_checkpoints_without_per_rank_state_still_restore_rank_0(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _seed(5)
    path = save_training_state(tmp_path, model, optimizer, 3, 0, Config())
    expected = _draws()
    state = torch.load(path, weights_only=True)
    state["rng"] = state["rng"][0]  # the format before per-rank states: one dict
    torch.save(state, path)
    _seed(6)
    assert (
        load_training_state(tmp_path, model, optimizer, rank=0)["rng_restored"]
        and _draws() == expected
    )
    assert not load_training_state(tmp_path, model, optimizer, rank=1)["rng_restored"]


def test_validation_slices_cover_each_image_once_and_score_as_one_process(tmp_path, synth_shards):
    folder = make_checkpoint(tmp_path, read_manifest(synth_shards)["categories"])
    model, cfg, _ = load_model_for_inference(folder)
    n = 5
    parts = [predict_shards(model, synth_shards, cfg, n, rank, 2) for rank in range(2)]
    ids = [part[1] for part in parts]
    assert len(ids[0]) == 3 and len(ids[1]) == 2 and not set(ids[0]) & set(ids[1])
    everything = predict_shards(model, synth_shards, cfg, n)
    assert sorted(ids[0] + ids[1]) == sorted(everything[1])
    gathered = score_predictions(synth_shards, parts[0][0] + parts[1][0], ids[0] + ids[1])
    assert gathered == evaluate_model(model, synth_shards, cfg, n)
    with pytest.raises(ValueError, match="rank 2"):
        predict_shards(model, synth_shards, cfg, n, 2, 2)


@pytest.mark.parametrize(
    "eval_period, due",
    [(0, [10]), (4, [4, 8, 10]), (5, [5, 10]), (1, list(range(1, 11)))],
)
def test_validation_runs_every_eval_period_and_at_the_end_only_with_0(eval_period, due):
    train = TrainConfig(eval_period=eval_period, checkpoint_period=2)
    assert [i for i in range(1, 11) if validation_due(train, i, 10)] == due


def test_validation_shards_without_a_validation_are_refused_at_once(tmp_path):
    """train does not import evaluation: the validation is handed in, and forgetting it is an error,
    not a run that silently never validates."""
    run = RunSettings(run_dir=str(tmp_path), val_shards="/data/val")
    with pytest.raises(ValueError, match="validation shards /data/val but no validation"):
        run_training_loop(Config(), ctx=None, run=run)  # before the context is used


def test_amp_maps_to_the_autocast_of_the_device(monkeypatch):
    from tensormask_ray.train import loop

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: True)
    assert autocast_dtype("none", cpu) is None and autocast_dtype("none", gpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16 == autocast_dtype("bf16", gpu)
    assert autocast_dtype("fp16", gpu) == torch.float16
    with pytest.warns(UserWarning, match="fp16 runs on a GPU only.*trains in float32"):
        assert autocast_dtype("fp16", cpu) is None
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: False)  # it would emulate bf16, slowly
    with pytest.warns(UserWarning, match="no bf16 instructions.*trains in float32"):
        assert autocast_dtype("bf16", cpu) is None
    assert autocast_dtype("bf16", gpu) == torch.bfloat16
    with pytest.warns(UserWarning, match="not on meta.*trains in float32"):
        assert autocast_dtype("bf16", torch.device("meta")) is None


def test_a_bf16_training_step_on_the_cpu_runs_the_convs_in_bf16_and_keeps_fp32_weights():
    """solver.amp=bf16 on the CPU: the convolutions run in bfloat16 (oneDNN), the weights,
    gradients and optimiser stay float32, and the losses stay within bf16's precision of the
    float32 step's on the same batch and weights."""
    from types import SimpleNamespace

    from tensormask_ray.config import load_config
    from tensormask_ray.data.local import synthetic_batches
    from tensormask_ray.train import loop
    from tensormask_ray.train.loop import _build_state, _train_step

    if not loop.cpu_has_bf16():
        pytest.skip("this CPU has no bf16 instructions: solver.amp=bf16 trains in float32 here")
    ctx = SimpleNamespace(
        prepare_model=lambda m: m, device=torch.device("cpu"), world_size=1, rank=0
    )
    losses = {}
    for amp in ("none", "bf16"):
        cfg = load_config(
            preset="cpu-small",
            overrides=["model.num_classes=4", f"solver.amp={amp}", "data.batch_size_per_worker=2"],
        )
        torch.manual_seed(0)
        state = _build_state(cfg, ctx, resuming=False)
        conv_dtypes = set()
        stem = next(m for m in state.model.modules() if isinstance(m, torch.nn.Conv2d))
        stem.register_forward_hook(lambda m, i, o, seen=conv_dtypes: seen.add(o.dtype))
        batch = next(iter(synthetic_batches(cfg, 2, image_size=128)(0)))
        loss, _, n = _train_step(state, cfg.solver, batch, ctx.device, lr=1e-3)
        assert n == 2 and torch.isfinite(loss)
        assert conv_dtypes == {torch.bfloat16 if amp == "bf16" else torch.float32}, amp
        assert all(p.dtype == torch.float32 for p in state.model.parameters())
        grads = [p.grad for p in state.model.parameters() if p.requires_grad]
        assert all(g is not None and g.dtype == torch.float32 for g in grads)
        losses[amp] = float(loss.detach())
    assert losses["bf16"] == pytest.approx(losses["none"], rel=0.03)

"""model.weights: a model starts from a checkpoint of ours (fine-tuning, e.g. a converted
Detectron2 model), checked before any worker starts, and not needed once training has begun."""

from __future__ import annotations

import torch

from tensormask_ray import cli
from tensormask_ray.config import apply_overrides
from tensormask_ray.modeling import build_model
from tensormask_ray.modeling.checkpoint_file import read_state
from tensormask_ray.train.checkpoint import load_model_for_inference, save_training_state
from tests.evaluation.checkpoints import make_checkpoint, tiny_config

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]


def test_model_weights_initialise_every_weight(tmp_path):
    source = make_checkpoint(tmp_path / "source", CATEGORIES, seed=1)
    cfg = tiny_config(len(CATEGORIES), **{"model.weights": str(source)})
    torch.manual_seed(123)  # a different random init underneath
    model = build_model(cfg)
    expected = read_state(source)["model"]
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_a_finetuned_checkpoint_does_not_need_its_source(tmp_path):
    source = make_checkpoint(tmp_path / "source", CATEGORIES, seed=1)
    cfg = tiny_config(len(CATEGORIES), **{"model.weights": str(source)})
    model = build_model(cfg)
    save_training_state(
        tmp_path / "tuned",
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        5,
        0,
        cfg,
        CATEGORIES,
    )
    (source / "state.pt").unlink()  # the config still names it
    loaded, loaded_cfg, _ = load_model_for_inference(tmp_path / "tuned")
    assert loaded_cfg.model.weights is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert apply_overrides(cfg, {"model.weights": None}).model.weights is None


def test_missing_model_weights_fail_before_any_worker_starts(synth_shards, tmp_path, capsys):
    rc = cli.main(["train", "--preset", "cpu-small", f"data.train_shards={synth_shards}", "model.num_classes=4",
                   f"model.weights={tmp_path / 'nowhere'}", "--storage-path", str(tmp_path / "runs")])  # fmt: skip
    assert rc == 2
    assert "model.weights" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()

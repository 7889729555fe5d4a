"""Distributed training on CPU with Ray Train (2 workers, gloo): the loss falls, a worker failure
is recovered from the last checkpoint with the LR schedule intact, --resume continues a stopped
run, MLflow holds the run, and a bad config fails before any worker starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensormask_ray import cli
from tensormask_ray.config import load_config
from tensormask_ray.train.loop import FAILURE_MARKER, PROGRESS_FILE
from tensormask_ray.train.schedule import LRSchedule

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = {
    "model.num_classes": 4,
    "solver.base_lr": 0.02,
    "solver.warmup_iters": 5,
    "solver.steps": [20],
    "train.log_period": 1,
    "train.checkpoint_period": 8,
    "train.cpus_per_worker": 0.5,
    "train.num_workers": 2,
    "data.batch_size_per_worker": 2,
    "input.min_size_train": [128, 160],
    "input.max_size_train": 200,
    "input.min_size_test": 160,
    "input.max_size_test": 200,
}


def tiny_config(shards: Path, storage: Path, run_name: str, **extra):
    overrides = {**TINY, "data.train_shards": str(shards), "train.storage_path": str(storage), "train.run_name": run_name, **extra}
    return load_config(preset="cpu-small", overrides=overrides)


def metric_history(uri: str, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"root": root, "uri": f"sqlite:///{root / 'mlflow.db'}"}


@pytest.fixture(scope="module")
def uninterrupted(ray_local, synth_shards, store):
    from tensormask_ray.train.trainer import run_training

    cfg = tiny_config(synth_shards, store["root"] / "runs", "plain", **{"solver.max_iter": 24})
    return cfg, run_training(cfg, mlflow_uri=store["uri"])


def test_two_workers_train_and_the_loss_falls(uninterrupted):
    cfg, out = uninterrupted
    assert out.error is None
    assert out.metrics["iteration"] == 24
    loss = metric_history(out.mlflow_uri, out.mlflow_run_id, "train/loss")
    assert sorted(loss) == list(range(1, 25))
    first = sum(loss[i] for i in range(1, 7)) / 6
    last = sum(loss[i] for i in range(19, 25)) / 6
    assert last < 0.85 * first, (first, last)


def test_mlflow_holds_the_run_with_params_metrics_and_checkpoint(uninterrupted):
    from mlflow.tracking import MlflowClient

    cfg, out = uninterrupted
    run = MlflowClient(out.mlflow_uri).get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.mask_head"] == "bipyramid"
    assert run.data.params["solver.max_iter"] == "24"
    for key in ("train/loss", "train/loss_mask", "train/lr", "train/images_per_sec", "train/data_wait_fraction"):
        assert key in run.data.metrics, key
    ckpt = Path(run.data.tags["checkpoint"])
    assert (ckpt / "state.pt").is_file() and ckpt.name == "checkpoint_0000024"
    assert Path(run.data.tags["best_checkpoint"]).is_dir()
    # keep_checkpoints = 2 of 3 reported
    assert len([p for p in Path(out.run_dir).glob("checkpoint_*") if p.is_dir()]) == cfg.train.keep_checkpoints


def test_worker_failure_recovers_from_last_checkpoint_with_the_same_lr(ray_local, synth_shards, store, uninterrupted):
    from tensormask_ray.train.trainer import run_training

    ref_cfg, ref = uninterrupted
    cfg = tiny_config(synth_shards, store["root"] / "runs", "failing", **{"solver.max_iter": 24, "train.fail_at_iter": 13})
    out = run_training(cfg, mlflow_uri=store["uri"])
    assert out.error is None
    assert (Path(out.run_dir) / FAILURE_MARKER).is_file()  # rank 1 did raise at iteration 13
    assert out.metrics["iteration"] == 24  # ends at the planned count, not 24 + 8
    lr = metric_history(out.mlflow_uri, out.mlflow_run_id, "train/lr")
    ref_lr = metric_history(ref.mlflow_uri, ref.mlflow_run_id, "train/lr")
    assert set(lr) == set(range(1, 25))
    for step, value in lr.items():
        assert value == pytest.approx(ref_lr[step], rel=1e-12), step
    # and both follow the schedule (LR of the step that reached `step`)
    sched = LRSchedule.from_config(cfg.solver, 4)
    assert lr[24] == pytest.approx(sched.lr_at(23)) and lr[24] < lr[19]  # step decay at 20


def test_resume_continues_a_stopped_run(ray_local, synth_shards, store, uninterrupted):
    from tensormask_ray.train.trainer import run_training

    _, ref = uninterrupted
    runs = store["root"] / "runs"
    first = run_training(tiny_config(synth_shards, runs, "stopped", **{"solver.max_iter": 8}), mlflow_uri=store["uri"])
    assert first.metrics["iteration"] == 8
    resumed = run_training(tiny_config(synth_shards, runs, "stopped", **{"solver.max_iter": 16}), resume=True, mlflow_uri=store["uri"])
    assert resumed.error is None and resumed.mlflow_run_id == first.mlflow_run_id
    assert resumed.metrics["iteration"] == 16
    lr = metric_history(resumed.mlflow_uri, resumed.mlflow_run_id, "train/lr")
    ref_lr = metric_history(ref.mlflow_uri, ref.mlflow_run_id, "train/lr")
    assert set(lr) == set(range(1, 17))  # 1-8 before the stop, 9-16 after: no restart from 0
    assert all(lr[s] == pytest.approx(ref_lr[s], rel=1e-12) for s in lr)
    import json

    assert json.loads((Path(resumed.run_dir) / PROGRESS_FILE).read_text())["iteration"] == 16


def test_existing_run_without_resume_is_refused(synth_shards, store, uninterrupted):
    from tensormask_ray.errors import UserError
    from tensormask_ray.train.trainer import check_run

    cfg = tiny_config(synth_shards, store["root"] / "runs", "plain", **{"solver.max_iter": 24})
    with pytest.raises(UserError, match="already exists"):
        check_run(cfg, resume=False)
    with pytest.raises(UserError, match="no run 'nope'"):
        check_run(tiny_config(synth_shards, store["root"] / "runs", "nope"), resume=True)


def test_bad_config_key_fails_before_any_worker_starts(synth_shards, tmp_path, capsys):
    rc = cli.main(["train", "--preset", "cpu-small", f"data.train_shards={synth_shards}", "model.mask_haed=bipyramid",
                   "--storage-path", str(tmp_path / "runs")])  # fmt: skip
    assert rc == 2
    assert "model.mask_haed" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    # a key that exists but disagrees with the data is caught before Ray starts too
    rc = cli.main(["train", "--preset", "cpu-small", f"data.train_shards={synth_shards}", "model.num_classes=7",
                   "--storage-path", str(tmp_path / "runs")])  # fmt: skip
    assert rc == 2
    assert "model.num_classes" in capsys.readouterr().err

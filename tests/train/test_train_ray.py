"""Distributed training on CPU with Ray Train (2 workers, gloo): the loss falls, a worker failure
is recovered from the last checkpoint with the LR schedule intact, --resume continues a stopped
run, MLflow holds the run (as its UI reads it: through a real `mlflow server`), and a bad config
fails before any worker starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tensormask_ray import cli
from tensormask_ray.config import load_config
from tensormask_ray.train.checkpoint import PROGRESS_FILE
from tensormask_ray.train.loop import FAILURE_MARKER
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
    "tracking.log_model": False,  # only the uninterrupted run's model is looked at (MLFLOW_EXTRAS)
}


def tiny_config(shards: Path, storage: Path, run_name: str, **extra):
    overrides = {
        **TINY,
        "data.train_shards": str(shards),
        "train.storage_path": str(storage),
        "train.run_name": run_name,
        **extra,
    }
    return load_config(preset="cpu-small", overrides=overrides)


def metric_history(uri: str, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_store):
    return {"root": tmp_path_factory.mktemp("train"), "uri": mlflow_store["uri"]}


# What the uninterrupted run adds for MLflow: validation on 2 images at 16 and 24 (metrics and
# overlays), system metrics every second, and its best checkpoint registered.
MLFLOW_EXTRAS = {
    "data.max_val_images": 2,
    "train.eval_period": 16,
    "tracking.overlay_images": 2,
    "tracking.system_metrics_interval": 1.0,
    "tracking.log_model": True,
    "tracking.registered_model": "plain-model",
}


@pytest.fixture(scope="module")
def uninterrupted(ray_local, synth_shards, store):
    """The run, through the Python API (`api.train`, what `tensormask-ray train` calls): the
    config it trained with and its TrainResult."""
    import shutil

    from tensormask_ray import api

    val = shutil.copytree(synth_shards, store["root"] / "val")  # same data, another dataset name
    extras = {**MLFLOW_EXTRAS, "data.val_shards": str(val), "solver.max_iter": 24}
    cfg = tiny_config(synth_shards, store["root"] / "runs", "plain", **extras)
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**TINY, **extras}.items()]
    overrides.append(f"data.train_shards={synth_shards}")
    result = api.train(
        preset="cpu-small",
        overrides=overrides,
        storage_path=str(store["root"] / "runs"),
        name="plain",
        mlflow_uri=store["uri"],
    )
    return cfg, result


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
    for key in (
        "train/loss",
        "train/loss_mask",
        "train/lr",
        "train/images_per_sec",
        "train/data_wait_fraction",
    ):
        assert key in run.data.metrics, key
    ckpt = Path(run.data.tags["checkpoint"])
    assert (ckpt / "state.pt").is_file() and ckpt.name == "checkpoint_0000024"
    assert Path(run.data.tags["best_checkpoint"]).is_dir()
    # the API's result names the run's folder, run and checkpoints as MLflow and the folder do
    assert (Path(out.run_dir) / "mlflow_run_id").read_text().strip() == out.mlflow_run_id
    assert Path(out.checkpoint) == ckpt and Path(out.checkpoint).parent == Path(out.run_dir)
    assert out.best_checkpoint == run.data.tags["best_checkpoint"]
    assert out.metrics["iteration"] == int(ckpt.name.removeprefix("checkpoint_"))  # its report
    # keep_checkpoints = 2 of 3 reported
    assert (
        len([p for p in Path(out.run_dir).glob("checkpoint_*") if p.is_dir()])
        == cfg.train.keep_checkpoints
    )


def test_worker_failure_recovers_from_last_checkpoint_with_the_same_lr(
    ray_local, synth_shards, store, uninterrupted
):
    from tensormask_ray.train.trainer import run_training

    ref_cfg, ref = uninterrupted
    cfg = tiny_config(
        synth_shards,
        store["root"] / "runs",
        "failing",
        **{"solver.max_iter": 24, "train.fail_at_iter": 13},
    )
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
    first = run_training(
        tiny_config(synth_shards, runs, "stopped", **{"solver.max_iter": 8}),
        mlflow_uri=store["uri"],
    )
    assert first.metrics["iteration"] == 8
    resumed = run_training(
        tiny_config(synth_shards, runs, "stopped", **{"solver.max_iter": 16}),
        resume=True,
        mlflow_uri=store["uri"],
    )
    assert resumed.error is None and resumed.mlflow_run_id == first.mlflow_run_id
    assert resumed.metrics["iteration"] == 16
    lr = metric_history(resumed.mlflow_uri, resumed.mlflow_run_id, "train/lr")
    ref_lr = metric_history(ref.mlflow_uri, ref.mlflow_run_id, "train/lr")
    assert set(lr) == set(range(1, 17))  # 1-8 before the stop, 9-16 after: no restart from 0
    assert all(lr[s] == pytest.approx(ref_lr[s], rel=1e-12) for s in lr)
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


def test_the_mlflow_ui_shows_the_run_its_data_overlays_system_metrics_and_model(
    uninterrupted, mlflow_store, mlflow_server, synth_shards
):
    import subprocess

    from tensormask_ray.tracking import experiment_id
    from tests.mlflow_server import datasets, metrics, params, tags

    cfg, out = uninterrupted
    rest = mlflow_server
    experiment = rest.experiment(cfg.tracking.experiment)
    # artifacts next to the store, not in the working directory; a server keeps its own
    assert experiment["artifact_location"].startswith(
        (mlflow_store["dir"] / "mlartifacts").as_uri()
    )
    served = rest.get(
        "experiments/get", experiment_id=experiment_id(rest.url, "made-through-the-server")
    )
    assert served["experiment"]["artifact_location"].startswith("mlflow-artifacts:")
    run = rest.run(out.mlflow_run_id)
    assert run["info"]["run_name"] == "plain" and run["info"]["status"] == "FINISHED"
    assert params(run)["solver.max_iter"] == "24" and params(run)["model.mask_head"] == "bipyramid"
    tag = tags(run)
    assert tag["mlflow.user"] and tag["mlflow.source.type"] == "LOCAL" and tag["mlflow.source.name"]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
    )
    if head.returncode == 0:  # a git checkout (CI's fresh clone is one)
        assert tag["mlflow.source.git.commit"] == head.stdout.strip()
    assert "status" not in tag and "error" not in tag

    # the shards as dataset inputs: name, digest, number of images, role
    inputs = {context["mlflow.data.context"]: dataset for dataset, context in datasets(run)}
    assert set(inputs) == {"training", "validation"}
    assert inputs["training"]["name"] == synth_shards.name and inputs["validation"]["name"] == "val"
    assert (
        inputs["training"]["digest"] == inputs["validation"]["digest"]
    )  # the content, not the place
    assert len(inputs["training"]["digest"]) == 10
    assert json.loads(inputs["training"]["profile"])["num_images"] == 24
    assert json.loads(inputs["training"]["source"])["uri"] == str(synth_shards)

    # metrics: training, validation at 16 and 24, system metrics sampled while training
    logged = metrics(run)
    for key in (
        "train/loss",
        "val/segm/AP",
        "val/bbox/AP",
        "system/cpu_utilization_percentage",
        "system/system_memory_usage_megabytes",
    ):
        assert key in logged, key
    assert [m["step"] for m in rest.metric_history(out.mlflow_run_id, "val/segm/AP")] == [16, 24]

    # artifacts: the config, the kept checkpoints, an overlay per image and validation
    assert {"config.yaml", "checkpoints.json", "images"} <= rest.artifacts(out.mlflow_run_id)
    kept = json.loads(rest.artifact_text(out.mlflow_run_id, "checkpoints.json"))
    assert [c["iteration"] for c in kept] == [16, 24] and all(
        Path(c["path"]).is_dir() for c in kept
    )
    images = [
        p
        for p in rest.artifacts(out.mlflow_run_id, "images")
        if p.endswith(".png") and "compressed" not in p
    ]
    steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in images)
    assert steps == [16, 16, 24, 24], images  # 2 images x 2 validations

    # the best checkpoint as a logged model, registered as version 1 of plain-model
    outputs = run["outputs"]["model_outputs"]
    assert len(outputs) == 1
    model = rest.logged_model(outputs[0]["model_id"])
    assert model["info"]["source_run_id"] == out.mlflow_run_id
    assert model["info"]["artifact_uri"].startswith((mlflow_store["dir"] / "mlartifacts").as_uri())
    version = rest.model_version("plain-model", "1")
    assert (
        version["run_id"] == out.mlflow_run_id
        and version["source"] == f"models:/{outputs[0]['model_id']}"
    )
    assert tags(run)["registered_model"] == "models:/plain-model/1"

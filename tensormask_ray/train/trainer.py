"""Builds and runs the Ray Train TorchTrainer for one training run (the driver side).

Run identity is `{storage_path}/{run_name}`: running again with the same name resumes from the
latest checkpoint (`--resume`); without `--resume` an existing run is an error rather than being
overwritten or silently continued. The MLflow run id lives beside the checkpoints, so a resumed
run keeps logging to the same MLflow run.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..capacity import check_capacity, train_reservation
from ..config import Config, ConfigError
from ..console import ensure_ray
from ..errors import UserError
from ..finite import is_finite_number
from ..modeling.checkpoint_file import state_path
from ..tracking import (
    Dataset,
    RunLogger,
    check_tracking_uri,
    register_model,
    resolve_tracking_uri,
    ui_command,
    ui_url,
)
from . import storage
from .checkpoint import MLFLOW_RUN_FILE, PROGRESS_FILE
from .loop import RunSettings, Validation, loop_config, train_loop_per_worker


@dataclass
class TrainOutcome:
    run_dir: str
    mlflow_uri: str
    mlflow_run_id: str
    metrics: dict[str, Any]
    checkpoint: str | None  # latest
    best_checkpoint: str | None
    error: BaseException | None


# ----------------------------------------------------------------------------- checks
def load_categories(shards_dir: str) -> list[dict]:
    from ..data.manifest import read_manifest

    if not shards_dir:
        raise ConfigError("config key 'data.train_shards': no training shards given")
    return list(read_manifest(shards_dir)["categories"])


def check_run(cfg: Config, resume: bool) -> tuple[str, str, list[dict]]:
    """Everything that can be checked before any worker starts. Returns (storage, run_dir, categories)."""
    categories = load_categories(cfg.data.train_shards)
    if len(categories) != cfg.model.num_classes:
        raise ConfigError(
            f"config key 'model.num_classes' is {cfg.model.num_classes} but the training shards "
            f"{cfg.data.train_shards} have {len(categories)} categories"
        )
    if cfg.model.weights:
        weights = Path(cfg.model.weights)
        if not state_path(weights).is_file():
            raise ConfigError(
                f"config key 'model.weights': no checkpoint at {weights} (a folder holding state.pt, or the file)"
            )
    if cfg.data.val_shards:
        val = load_categories(cfg.data.val_shards)
        if [c["id"] for c in val] != [c["id"] for c in categories]:
            raise ConfigError(
                "config key 'data.val_shards': its categories differ from the training shards'"
            )
    if cfg.train.use_gpu:
        import torch

        if not torch.cuda.is_available() and not os.environ.get("RAY_ADDRESS"):
            raise UserError(
                "--use-gpu (train.use_gpu) was given but this machine has no CUDA device"
            )
    store = storage.absolute(cfg.train.storage_path)
    run_dir = storage.join(store, cfg.train.run_name)
    exists = storage.exists(storage.join(run_dir, MLFLOW_RUN_FILE))
    if exists and not resume:
        raise UserError(
            f"run '{cfg.train.run_name}' already exists in {store}: pass --resume to continue it, "
            "or choose another train.run_name"
        )
    if resume and not exists:
        raise UserError(f"--resume: no run '{cfg.train.run_name}' in {store} to resume")
    return store, run_dir, categories


def checkpoint_metric(cfg: Config) -> tuple[str, str]:
    """(metric, mode) by which the best K checkpoints are kept."""
    if cfg.train.checkpoint_metric.startswith("val/") and not cfg.data.val_shards:
        return "train/loss", "min"  # nothing to validate on: keep the lowest training loss
    return cfg.train.checkpoint_metric, cfg.train.checkpoint_mode


# ----------------------------------------------------------------------------- trainer
def _check_validation(cfg: Config, validation: Validation | None) -> None:
    if cfg.data.val_shards and validation is None:
        raise ValueError(
            "config key 'data.val_shards' is set but no validation was handed to the trainer "
            "(validation=evaluation.validation.validate_on_shards)"
        )


def build_trainer(
    cfg: Config,
    store: str,
    categories: list[dict],
    mlflow_uri: str,
    mlflow_run_id: str,
    callbacks: list | None = None,
    start_epoch: int = 0,
    validation: Validation | None = None,
):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..data.dataset import build_train_dataset, train_data_config
    from .events import WorkerFailures

    _check_validation(cfg, validation)

    metric, mode = checkpoint_metric(cfg)
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    run = RunSettings(
        run_dir=storage.join(store, cfg.train.run_name),
        checkpoint_metric=metric,
        categories=categories,
        val_shards=os.path.abspath(cfg.data.val_shards) if cfg.data.val_shards else "",
        mlflow_uri=mlflow_uri,
        mlflow_run_id=mlflow_run_id,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(cfg, run, validation),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name,
            storage_path=store,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=metric,
                checkpoint_score_order=mode,
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[WorkerFailures(cfg.train.max_failures), *(callbacks or [])],
            # Plain prints from the workers (progress lines): Ray Train's print-to-logger patch
            # would duplicate them and defeats pycocotools' silencing.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
        datasets={
            "train": build_train_dataset(cfg.data.train_shards, cfg, start_epoch=start_epoch)
        },
        dataset_config=train_data_config(),
    )


def _checkpoint_path(ckpt) -> str | None:
    if ckpt is None:
        return None
    path = ckpt.path
    fs = getattr(ckpt, "filesystem", None)
    if fs is not None and type(fs).__name__ != "LocalFileSystem":
        return f"{fs.type_name}://{path}"
    return path


def start_mlflow_run(
    cfg: Config,
    run_dir: str,
    mlflow_uri: str,
    resume: bool,
    tags: dict | None = None,
    run_name: str | None = None,
    context_tags: dict | None = None,
) -> RunLogger:
    """The run's MLflow run: reopened when resuming, else a new one named `run_name` (default
    train.run_name) holding the config (params and config.yaml) and the datasets."""
    run_file = storage.join(run_dir, MLFLOW_RUN_FILE)
    previous = (storage.read_text(run_file) or "").strip() if resume else None
    if previous:
        logger = RunLogger(mlflow_uri, previous)
        logger.reopen()
        return logger
    logger = RunLogger.create(
        mlflow_uri,
        cfg.tracking.experiment,
        run_name or cfg.train.run_name,
        tags=tags,
        context_tags=context_tags,
    )
    logger.log_params(cfg.flat())
    logger.log_text(cfg.to_yaml(), "config.yaml")
    logger.set_tags({"run_dir": run_dir})
    log_datasets(logger, cfg)
    storage.write_text(run_file, logger.run_id)
    return logger


def log_datasets(logger: RunLogger, cfg: Config) -> None:
    """The training and validation shards as the run's dataset inputs."""
    from ..data.manifest import dataset_summary

    for shards, context in (
        (cfg.data.train_shards, "training"),
        (cfg.data.val_shards, "validation"),
    ):
        if shards:
            logger.log_dataset(Dataset(**dataset_summary(shards)), context)


def log_checkpoint_model(
    logger: RunLogger, checkpoint: str, registered_model: str = "", *, model_loader: str
) -> tuple[str, str | None]:
    """Logs a checkpoint's weights as the run's MLflow model (or finds the one already logged from
    it) and, given a name, registers it as a new version of that model. Returns (model id,
    registered version or None). `model_loader`: the model's pyfunc loader module, handed in by
    the caller (evaluation.mlflow_model.LOADER_MODULE; train does not import evaluation)."""
    import tempfile
    from pathlib import Path

    from .checkpoint import export_for_inference

    logged = [
        model_id
        for model_id, tags in logger.logged_models()
        if tags.get("checkpoint") == checkpoint
    ]
    if logged:
        model_id = logged[-1]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / checkpoint.rstrip("/").rsplit("/", 1)[-1]
            iteration = export_for_inference(checkpoint, folder)
            model_id = logger.log_model(
                folder,
                step=iteration,
                loader_module=model_loader,
                tags={"checkpoint": checkpoint, "iteration": iteration},
            )
    version = None
    if registered_model:
        version = register_model(logger.uri, model_id, registered_model)
        logger.set_tags({"registered_model": f"models:/{registered_model}/{version}"})
    return model_id, version


def publish_model(
    logger: RunLogger, checkpoint: str, registered_model: str, who: str, *, model_loader: str
) -> str | None:
    """`log_checkpoint_model` at the end of a finished run or sweep: a failure to log or register
    is a warning (the training is done and its checkpoints are safe), with the tag model_error.
    Returns the registered version, if any."""
    try:
        _, version = log_checkpoint_model(
            logger, checkpoint, registered_model, model_loader=model_loader
        )
    except Exception as e:  # noqa: BLE001 - reported, and the run still ends as what it was
        print(
            f"[{who}] warning: checkpoint {checkpoint} could not be logged as an MLflow model: {e}",
            file=sys.stderr,
            flush=True,
        )
        logger.set_tags({"model_error": f"{type(e).__name__}: {e}"[:5000]})
        return None
    if version:
        print(
            f"[{who}] registered checkpoint {checkpoint} as models:/{registered_model}/{version}",
            flush=True,
        )
    return version


def record_checkpoints(logger: RunLogger, result, metric: str) -> None:
    """checkpoints.json: the kept checkpoints (their storage URIs), iteration and `metric`."""
    kept = []
    for ckpt, metrics in result.best_checkpoints or []:
        kept.append(
            {
                "path": _checkpoint_path(ckpt),
                "iteration": metrics.get("iteration"),
                metric: metrics.get(metric),
            }
        )
    if kept:
        logger.log_dict(sorted(kept, key=lambda c: c["iteration"] or 0), "checkpoints.json")


def run_training(
    cfg: Config,
    *,
    resume: bool = False,
    address: str | None = None,
    mlflow_uri: str | None = None,
    validation: Validation | None = None,
    model_loader: str | None = None,
) -> TrainOutcome:
    """Validates, starts (or resumes) the run and blocks until it ends. `validation`: what runs
    on `data.val_shards` (evaluation.validation.validate_on_shards; needed when they are set).
    `model_loader`: the pyfunc loader module of the MLflow model logged from the best checkpoint
    (evaluation.mlflow_model.LOADER_MODULE; needed when tracking.log_model is on)."""
    _check_validation(cfg, validation)
    if cfg.tracking.log_model and not model_loader:
        raise ConfigError(
            "config key 'tracking.log_model' is on but no model loader was handed to the trainer "
            "(model_loader=evaluation.mlflow_model.LOADER_MODULE); or set tracking.log_model=false"
        )
    store, run_dir, categories = check_run(cfg, resume)
    ensure_ray(address)
    check_capacity(
        train_reservation(cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.use_gpu),
        "training",
    )
    uri = resolve_tracking_uri(mlflow_uri or cfg.tracking.mlflow_uri)
    check_tracking_uri(uri)
    logger = start_mlflow_run(cfg, run_dir, uri, resume)
    print(
        f"[train] run '{cfg.train.run_name}' in {run_dir}; MLflow run {logger.run_id} ({uri})",
        flush=True,
    )
    t0 = time.time()
    progress = storage.read_json(storage.join(run_dir, PROGRESS_FILE)) if resume else None
    start_epoch = progress["epoch"] + 1 if progress else 0
    trainer = build_trainer(
        cfg, store, categories, uri, logger.run_id, start_epoch=start_epoch, validation=validation
    )
    error: BaseException | None = None
    try:
        result = trainer.fit()
        error = result.error
    except Exception as e:  # noqa: BLE001 - recorded in MLflow, then re-raised
        logger.log_error(e)
        logger.end("FAILED")
        raise
    metric, mode = checkpoint_metric(cfg)
    best = result.get_best_checkpoint(metric, mode) if result.best_checkpoints else None
    outcome = TrainOutcome(
        run_dir=run_dir,
        mlflow_uri=uri,
        mlflow_run_id=logger.run_id,
        metrics={k: v for k, v in (result.metrics or {}).items() if is_finite_number(v)},
        checkpoint=_checkpoint_path(result.checkpoint),
        best_checkpoint=_checkpoint_path(best),
        error=error,
    )
    logger.set_tags(
        {
            "checkpoint": outcome.checkpoint or "",
            "best_checkpoint": outcome.best_checkpoint or "",
            "train_seconds": f"{time.time() - t0:.1f}",
        }
    )
    record_checkpoints(logger, result, metric)
    if error:
        logger.log_error(error)
    elif outcome.best_checkpoint and cfg.tracking.log_model:
        publish_model(
            logger,
            outcome.best_checkpoint,
            cfg.tracking.registered_model,
            "train",
            model_loader=model_loader,
        )
    logger.end("FAILED" if error else "FINISHED")
    print(
        f"[train] {'FAILED' if error else 'finished'}: checkpoint {outcome.checkpoint}", flush=True
    )
    print(f"[train] best checkpoint ({metric}): {outcome.best_checkpoint}", flush=True)
    print(f"[train] see the run in MLflow: {ui_command(uri)}", flush=True)
    print(f"[train]   then open {ui_url(uri, cfg.tracking.experiment)}", flush=True)
    return outcome


__all__ = [
    "TrainOutcome",
    "build_trainer",
    "check_run",
    "log_checkpoint_model",
    "publish_model",
    "record_checkpoints",
    "run_training",
    "start_mlflow_run",
]

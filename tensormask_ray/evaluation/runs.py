"""Which checkpoint to evaluate, and where in MLflow its evaluation goes.

A checkpoint is named directly (`--checkpoint PATH`), through the MLflow run of the training that
wrote it (`--mlflow-run ID`: its `best_checkpoint` tag, else `checkpoint`, else the newest
`checkpoint_*` folder of its `run_dir`), or as a registered MLflow model (`--model
models:/NAME/VERSION`, downloaded); the best trial of a sweep (`--best-of SWEEP`) is found by
`tensormask_ray.api` through tune.results (the layer above) and handed here as a CheckpointRef. An evaluation is its own MLflow run, named by checkpoint and
split (`eval checkpoint_0090000 val2017`), nested under the training run (or trial) that wrote the
checkpoint: the one named, else the one whose id is in the `mlflow_run_id` file of the training
run's folder, beside the checkpoint folders (see `train/trainer.py`), else the run that logged
the registered model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..modeling.checkpoint_file import state_path
from ..train.checkpoint import MLFLOW_RUN_FILE
from ..train.context import checkpoint_folders


@dataclass
class CheckpointRef:
    path: str  # a checkpoint folder (holding state.pt) or the state.pt file
    mlflow_run_id: str | None = None  # the training run that wrote it
    explicit_run: bool = False  # named by the user: not being able to log to it is an error
    how: str = "--checkpoint"
    label: str = ""  # how the evaluation run names it (default: the checkpoint folder's name)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        p = Path(self.path)
        return p.parent.name if p.name.endswith(".pt") else p.name


def resolve_checkpoint(
    checkpoint: str | None = None,
    mlflow_run: str | None = None,
    mlflow_uri: str = "",
    model: str | None = None,
    download_dir: str | Path | None = None,
) -> CheckpointRef:
    """One of checkpoint / model, or mlflow_run alone; mlflow_run with checkpoint means "this
    checkpoint, and log under that run". A model is downloaded into `download_dir` (default: a
    temporary folder)."""
    if checkpoint and model:
        raise UserError("give one of --checkpoint, --best-of and --model")
    if model:
        return registered_model_checkpoint(model, mlflow_uri, download_dir, mlflow_run)
    if checkpoint:
        from ..modeling.checkpoint_file import checkpoint_file

        path = Path(checkpoint)
        try:
            checkpoint_file(path)  # a path that is not one of our checkpoints fails here, named
        except UserError as e:
            raise UserError(f"--checkpoint: {e}") from None
        run_id = mlflow_run or run_id_beside(path)
        return CheckpointRef(str(path.resolve()), run_id, explicit_run=bool(mlflow_run))
    if mlflow_run:
        return CheckpointRef(
            checkpoint_of_run(mlflow_run, mlflow_uri),
            mlflow_run,
            True,
            f"--mlflow-run {mlflow_run}",
        )
    raise UserError("which model? give --checkpoint PATH, --mlflow-run ID or --best-of SWEEP")


def registered_model_checkpoint(
    model: str, mlflow_uri: str, download_dir: str | Path | None, mlflow_run: str | None = None
) -> CheckpointRef:
    """A model logged by a training run (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, ...),
    downloaded; its evaluation goes under the run that logged it (or `mlflow_run`)."""
    import tempfile

    from ..tracking import download_model, model_ref, resolve_tracking_uri
    from .mlflow_model import LOADER_MODULE

    uri = resolve_tracking_uri(mlflow_uri)
    ref = model_ref(uri, model)
    folder = download_model(
        uri, model, download_dir or tempfile.mkdtemp(prefix="tensormask-model-"), LOADER_MODULE
    )
    return CheckpointRef(
        str(folder), mlflow_run or ref.run_id, bool(mlflow_run), f"--model {model}", ref.label
    )


def run_id_beside(checkpoint: Path) -> str | None:
    """The MLflow run id stored in the training run's folder: checkpoint_*/../mlflow_run_id."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    run_file = folder.parent / MLFLOW_RUN_FILE
    if run_file.is_file():
        return run_file.read_text().strip() or None
    return None


def checkpoint_of_run(run_id: str, mlflow_uri: str) -> str:
    from ..tracking import get_run, resolve_tracking_uri

    uri = resolve_tracking_uri(mlflow_uri)
    tags = get_run(uri, run_id).data.tags
    for key in ("best_checkpoint", "checkpoint"):
        path = tags.get(key, "")
        if path and Path(path).exists():
            return path
    run_dir = Path(tags.get("run_dir", ""))
    found = checkpoint_folders(run_dir) if tags.get("run_dir") else []
    if found:
        return str(found[-1])
    raise UserError(
        f"MLflow run {run_id} ({uri}) names no checkpoint that exists here (tags best_checkpoint, "
        f"checkpoint: {tags.get('best_checkpoint')!r}, {tags.get('checkpoint')!r}; run_dir "
        f"{tags.get('run_dir')!r}); pass --checkpoint PATH"
    )


def checkpoint_iteration(path: str | Path) -> int | None:
    """The training iteration stored in a checkpoint (the MLflow step of its metrics). Memory-
    mapped, so the weights are not read."""
    import torch

    try:
        state = torch.load(state_path(path), map_location="cpu", weights_only=True, mmap=True)
        return int(state.get("iteration", 0))
    except Exception:  # noqa: BLE001 - only a step number; load_model_for_inference reports errors
        return None


def log_evaluation_run(
    ref: CheckpointRef,
    mlflow_uri: str,
    experiment: str,
    split: str,
    metrics: dict[str, float],
    step: int,
    params: dict[str, Any],
    artifacts: list[Path],
    dataset: dict[str, Any] | None = None,
    standalone: bool = False,
) -> str | None:
    """The evaluation as its own MLflow run `eval <checkpoint> <split>`, nested under the
    checkpoint's training run, in that run's experiment. Without a training run (or with one
    that is not in the store) it is a top-level run in `experiment` when `standalone`, else not
    logged (None; a warning names a run found beside the checkpoint but missing from the store).
    Returns the run id."""
    from ..tracking import Dataset, RunLogger, get_run, resolve_tracking_uri

    uri = resolve_tracking_uri(mlflow_uri)
    parent = None
    if ref.mlflow_run_id:
        try:
            parent = get_run(uri, ref.mlflow_run_id)
        except UserError as e:
            if ref.explicit_run:
                raise
            print(
                f"warning: the checkpoint's MLflow run {ref.mlflow_run_id} is not in {uri}; the "
                f"evaluation is not nested under it (pass --mlflow-uri): {str(e).splitlines()[0]}",
                file=sys.stderr,
            )
    if parent is None and not standalone:
        return None
    if parent is not None:
        from ..tracking import experiment_name

        experiment = experiment_name(uri, parent.info.experiment_id)
    tags = {"evaluation.checkpoint": ref.path, "evaluation.split": split}
    logger = RunLogger.create(
        uri,
        experiment,
        f"eval {ref.name} {split}",
        tags=tags,
        parent_run_id=parent and parent.info.run_id,
    )
    try:
        logger.log_params(params)
        if dataset:
            logger.log_dataset(Dataset(**dataset), "evaluation")
        logger.log_metrics(metrics, step=step)
        for path in artifacts:
            logger.log_artifact(path)
    except BaseException as e:
        logger.log_error(e)
        logger.end("FAILED")
        raise
    logger.end("FINISHED")
    return logger.run_id


__all__ = [
    "CheckpointRef",
    "checkpoint_iteration",
    "checkpoint_of_run",
    "log_evaluation_run",
    "registered_model_checkpoint",
    "resolve_checkpoint",
    "run_id_beside",
]

"""Which checkpoint to evaluate, and which MLflow run its results belong to.

A checkpoint is named directly (`--checkpoint PATH`), through the MLflow run of the training that
wrote it (`--mlflow-run ID`: its `best_checkpoint` tag, else `checkpoint`, else the newest
`checkpoint_*` folder of its `run_dir`), or as the best trial of a sweep (`--best-of SWEEP`,
through `tensormask_ray.tune.results.best_checkpoint`). The run that receives the metrics is the
one named, else the one whose id is in the `mlflow_run_id` file of the training run's folder,
beside the checkpoint folders (see `train/trainer.py`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

MLFLOW_RUN_FILE = "mlflow_run_id"  # train/trainer.py writes it in the run folder


@dataclass
class CheckpointRef:
    path: str  # a checkpoint folder (holding state.pt) or the state.pt file
    mlflow_run_id: str | None = None
    explicit_run: bool = False  # named by the user: not being able to log to it is an error
    how: str = "--checkpoint"


def resolve_checkpoint(
    checkpoint: str | None = None,
    mlflow_run: str | None = None,
    best_of: str | None = None,
    mlflow_uri: str = "",
    sweep_storage: str | None = None,
) -> CheckpointRef:
    """Exactly one of checkpoint / best_of, or mlflow_run alone; mlflow_run with checkpoint
    means "this checkpoint, and log to that run"."""
    if checkpoint and best_of:
        raise UserError("give --checkpoint or --best-of, not both")
    if checkpoint:
        from ..train.checkpoint import checkpoint_file

        path = Path(checkpoint)
        try:
            checkpoint_file(path)  # a path that is not one of our checkpoints fails here, named
        except UserError as e:
            raise UserError(f"--checkpoint: {e}") from None
        run_id = mlflow_run or run_id_beside(path)
        return CheckpointRef(str(path.resolve()), run_id, explicit_run=bool(mlflow_run))
    if best_of:
        path, metrics = best_trial_checkpoint(best_of, sweep_storage)
        run_id = mlflow_run or metrics.get("mlflow_run_id") or run_id_beside(Path(path))
        return CheckpointRef(
            str(path), run_id, explicit_run=bool(mlflow_run), how=f"--best-of {best_of}"
        )
    if mlflow_run:
        return CheckpointRef(
            checkpoint_of_run(mlflow_run, mlflow_uri),
            mlflow_run,
            True,
            f"--mlflow-run {mlflow_run}",
        )
    raise UserError("which model? give --checkpoint PATH, --mlflow-run ID or --best-of SWEEP")


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
    found = sorted(run_dir.glob("checkpoint_*")) if tags.get("run_dir") and run_dir.is_dir() else []
    found = [p for p in found if (p / "state.pt").is_file()]
    if found:
        return str(found[-1])
    raise UserError(
        f"MLflow run {run_id} ({uri}) names no checkpoint that exists here (tags best_checkpoint, "
        f"checkpoint: {tags.get('best_checkpoint')!r}, {tags.get('checkpoint')!r}; run_dir "
        f"{tags.get('run_dir')!r}); pass --checkpoint PATH"
    )


def best_trial_checkpoint(sweep: str, storage_path: str | None) -> tuple[str, dict[str, Any]]:
    """The best trial's checkpoint of a sweep, through the tune package (imported only here)."""
    try:
        from ..tune.results import best_checkpoint
    except ImportError as e:
        raise UserError(
            f"--best-of {sweep}: finding a sweep's best checkpoint needs "
            "tensormask_ray.tune.results.best_checkpoint, which this installation does not have "
            f"yet ({e}); pass --checkpoint PATH of the trial instead"
        ) from e
    kwargs = {"storage_path": storage_path} if storage_path else {}
    path, metrics = best_checkpoint(sweep, **kwargs)
    if not path:
        raise UserError(f"--best-of {sweep}: the sweep has no trial with a checkpoint")
    return str(path), dict(metrics or {})


def checkpoint_iteration(path: str | Path) -> int | None:
    """The training iteration stored in a checkpoint (the MLflow step of its metrics). Memory-
    mapped, so the weights are not read."""
    import torch

    p = Path(path)
    p = p / "state.pt" if p.is_dir() else p
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        return int(state.get("iteration", 0))
    except Exception:  # noqa: BLE001 - only a step number; load_model_for_inference reports errors
        return None


def log_to_run(
    ref: CheckpointRef,
    mlflow_uri: str,
    metrics: dict[str, float],
    step: int,
    tags: dict[str, Any],
    artifacts: list[Path],
    artifact_path: str = "evaluation",
) -> str | None:
    """Logs to the checkpoint's MLflow run; returns the run id, or None when there is none (a
    warning is printed when a run found beside the checkpoint is not in the store)."""
    from ..tracking import RunLogger, get_run, resolve_tracking_uri

    if not ref.mlflow_run_id:
        return None
    uri = resolve_tracking_uri(mlflow_uri)
    try:
        get_run(uri, ref.mlflow_run_id)
    except UserError as e:
        if ref.explicit_run:
            raise
        print(
            f"warning: the checkpoint's MLflow run {ref.mlflow_run_id} is not in {uri}; metrics "
            f"not logged (pass --mlflow-uri): {str(e).splitlines()[0]}",
            file=sys.stderr,
        )
        return None
    logger = RunLogger(uri, ref.mlflow_run_id)
    logger.log_metrics(metrics, step=step)
    logger.set_tags(tags)
    for path in artifacts:
        logger.log_artifact(path, artifact_path)
    return ref.mlflow_run_id


__all__ = [
    "CheckpointRef",
    "best_trial_checkpoint",
    "checkpoint_iteration",
    "checkpoint_of_run",
    "log_to_run",
    "resolve_checkpoint",
    "run_id_beside",
]

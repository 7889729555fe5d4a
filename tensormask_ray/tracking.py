"""The only module that talks to MLflow.

Store: `tracking.mlflow_uri` if set, else MLFLOW_TRACKING_URI, else an embedded sqlite store
`sqlite:///<cwd>/mlflow.db`. URIs handed to Ray workers are always absolute. An unreachable
server is a `UserError` at start, not a crash hours into a run.
"""

from __future__ import annotations

import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UserError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

_PARAM_VALUE_MAX = 6000  # MLflow 3 limit on a param value
_BATCH = 100  # params / metrics per log_batch call


def resolve_tracking_uri(uri: str = "") -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        uri = f"sqlite:///{Path('mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # sqlite:///relative.db -> absolute, so workers in other directories hit the same file
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
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
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in params.items():
        s = "" if v is None else str(v)
        out[k] = s if len(s) <= _PARAM_VALUE_MAX else s[: _PARAM_VALUE_MAX - 3] + "..."
    return out


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
    ) -> RunLogger:
        client = _client(uri)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
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
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        """status: FINISHED | FAILED | KILLED."""
        self.client.set_terminated(self.run_id, status)

    def reopen(self) -> None:
        """Marks a terminated run as running again (a resumed training run)."""
        self.client.update_run(self.run_id, status="RUNNING")


def find_runs(uri: str, experiment: str, filter_string: str = "", order_by: list[str] | None = None):
    """Runs of an experiment as mlflow Run objects (empty if the experiment does not exist)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=filter_string, order_by=order_by or [], max_results=5000)


def get_run(uri: str, run_id: str):
    try:
        return _client(uri).get_run(run_id)
    except Exception as e:  # mlflow raises MlflowException for unknown ids
        raise UserError(f"MLflow run {run_id} not found in {uri}: {e}") from e


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"

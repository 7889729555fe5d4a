"""tracking.py's own rules (the rest is checked through a real MLflow server by the training,
sweep and evaluation tests): where a store's artifacts go, experiment folder names."""

from __future__ import annotations

from pathlib import Path

from tensormask_ray.tracking import _folder_name, artifact_root


def test_artifacts_go_next_to_their_store_and_two_stores_never_share_a_folder():
    assert artifact_root("sqlite:////data/demo/mlflow.db") == Path("/data/demo/mlartifacts")
    assert artifact_root("sqlite:////data/demo/other.db") == Path("/data/demo/other.db-mlartifacts")
    assert artifact_root("sqlite:////data/demo/mlflow.sqlite") == Path(
        "/data/demo/mlflow.sqlite-mlartifacts"
    )
    assert artifact_root("http://mlflow:5000") is None  # a server keeps its own


def test_experiment_folders_are_one_folder_each_and_distinct():
    assert _folder_name("tensormask") == "tensormask"
    names = ["a/b", "a_b", "a b", "../x", ""]
    folders = [_folder_name(n) for n in names]
    assert len(set(folders)) == len(names)
    assert all("/" not in f and not f.startswith(".") and f for f in folders)


class _Client:
    def __init__(self, error: Exception):
        self.error = error

    def get_run(self, run_id):
        raise self.error


def test_get_run_tells_a_missing_run_from_a_store_that_cannot_be_asked(monkeypatch):
    import pytest
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from tensormask_ray import tracking
    from tensormask_ray.errors import UserError

    missing = MlflowException("Run 'abc' not found", error_code=RESOURCE_DOES_NOT_EXIST)
    monkeypatch.setattr(tracking, "_client", lambda uri: _Client(missing))
    with pytest.raises(UserError, match="MLflow run abc not found in sqlite:///m.db"):
        tracking.get_run("sqlite:///m.db", "abc")
    down = MlflowException("API request to http://h:5000 failed with exception ConnectionError")
    monkeypatch.setattr(tracking, "_client", lambda uri: _Client(down))
    with pytest.raises(UserError, match="could not read MLflow run abc from http://h:5000") as info:
        tracking.get_run("http://h:5000", "abc")
    assert "not found" not in str(info.value)
    monkeypatch.setattr(tracking, "_client", lambda uri: _Client(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):  # not turned into a user error
        tracking.get_run("http://h:5000", "abc")


class _Recorder:
    def __init__(self):
        self.batches = []

    def log_batch(self, run_id, metrics=(), params=()):
        self.batches.append((run_id, list(metrics), list(params)))


def test_log_metrics_logs_finite_numbers_only_in_batches(monkeypatch):
    """NaN, infinities, bools and non-numbers are not metrics (MLflow would store NaN or fail);
    '@' (in names like AP@0.5) is not allowed in MLflow metric names; at most _BATCH per call."""
    import math

    import numpy as np

    from tensormask_ray import tracking

    recorder = _Recorder()
    monkeypatch.setattr(tracking, "_client", lambda uri: recorder)
    logger = tracking.RunLogger("sqlite:///m.db", "run1")
    logger.log_metrics(
        {
            "loss": 0.5,
            "ap@0.5": np.float32(0.25),
            "nan": math.nan,
            "inf": math.inf,
            "flag": True,
            "name": "x",
        },
        step=7,
    )
    ((run_id, metrics, _),) = recorder.batches
    assert run_id == "run1"
    assert {(m.key, m.value, m.step) for m in metrics} == {("loss", 0.5, 7), ("ap_0.5", 0.25, 7)}
    recorder.batches.clear()
    logger.log_metrics({f"m{i}": float(i) for i in range(tracking._BATCH + 1)}, step=1)
    assert [len(m) for _, m, _ in recorder.batches] == [tracking._BATCH, 1]

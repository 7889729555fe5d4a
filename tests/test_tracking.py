"""tracking.py's own rules (the rest is checked through a real MLflow server by the training,
sweep and evaluation tests): where a store's artifacts go, experiment folder names."""

from __future__ import annotations

from pathlib import Path

from tensormask_ray.tracking import _folder_name, artifact_root


def test_artifacts_go_next_to_their_store_and_two_stores_never_share_a_folder():
    assert artifact_root("sqlite:////data/demo/mlflow.db") == Path("/data/demo/mlartifacts")
    assert artifact_root("sqlite:////data/demo/other.db") == Path("/data/demo/other.db-mlartifacts")
    assert artifact_root("sqlite:////data/demo/mlflow.sqlite") == Path("/data/demo/mlflow.sqlite-mlartifacts")
    assert artifact_root("http://mlflow:5000") is None  # a server keeps its own


def test_experiment_folders_are_one_folder_each_and_distinct():
    assert _folder_name("tensormask") == "tensormask"
    names = ["a/b", "a_b", "a b", "../x", ""]
    folders = [_folder_name(n) for n in names]
    assert len(set(folders)) == len(names)
    assert all("/" not in f and not f.startswith(".") and f for f in folders)

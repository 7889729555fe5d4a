"""Warnings about paths a job cannot share. Paths the command will read or write on the cluster
(storage path, shards, checkpoints, the MLflow store) must be shared: absolute paths on a
filesystem every node mounts, or object-store URIs. A relative path would resolve inside the
job's temporary copy of the working dir on one node, so `submit` warns about each one it finds,
and about a train or sweep job with no MLflow store or storage path at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import PATH_KEYS
from .argv import option_value

# Path-valued options and config keys that must point at shared storage on a cluster.
_PATH_OPTIONS = (
    "--storage-path",
    "--checkpoint",
    "--out",
    "--out-dir",
    "--mlflow-uri",
    "--shards",
    "--coco-json",
    "--images-dir",
)
# Keys of config and sweep-spec files, by their last name, that hold paths: the config's
# PATH_KEYS, and the spec's and tracking's own.
_PATH_KEYS = frozenset(
    [key.rsplit(".", 1)[-1] for key in PATH_KEYS]
    + ["storage_path", "mlflow_uri", "checkpoint", "out_dir"]
)


def _path_problem(what: str, value: str) -> str | None:
    """A warning if `value` cannot be shared storage on a cluster, else None."""
    value = value.strip()
    if not value:
        return None
    if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
        return f"{what} {value} is a relative sqlite path: in the job it resolves inside a temporary working dir"
    if "://" in value:
        return None
    if not os.path.isabs(value):
        return (
            f"{what} {value!r} is a relative path: in the job it resolves inside the job's temporary "
            "copy of the working dir on one node (data and checkpoints are not shipped, and nothing "
            "written there survives the job); give an absolute path on a filesystem every node "
            "mounts, or an object-store URI (s3://..., gs://...)"
        )
    return None


def _walk_keys(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, str) and str(k) in _PATH_KEYS:
                found.append((key, v))
            else:
                found.extend(_walk_keys(v, key))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found.extend(_walk_keys(v, f"{prefix}[{i}]"))
    return found


def shared_path_warnings(args: list[str], files: list[Path]) -> list[str]:
    """Warnings for path-valued options, `key=value` overrides and config/spec keys that cannot
    be shared storage."""
    import yaml

    problems: list[str | None] = []
    for i, tok in enumerate(args):
        for name in _PATH_OPTIONS:
            value, _ = option_value(args, i, name)
            if value is not None:
                problems.append(_path_problem(name, value))
        if "=" in tok and not tok.startswith("-"):
            key, value = tok.split("=", 1)
            if key.rsplit(".", 1)[-1] in _PATH_KEYS:
                problems.append(_path_problem(key, value))
    for f in files:
        try:
            data = yaml.safe_load(f.read_text())
        except (OSError, yaml.YAMLError):
            continue  # the command itself reports a bad file, with its own message
        for key, value in _walk_keys(data):
            problem = _path_problem(f"{f.name}: {key}", value)
            problems.append(problem)
    return list(dict.fromkeys(p for p in problems if p))


_NO_MLFLOW = (
    "no MLflow store given (MLFLOW_TRACKING_URI or --mlflow-uri): unless the cluster's nodes set "
    "MLFLOW_TRACKING_URI themselves, the job tracks to sqlite in its temporary working dir, which "
    "is deleted with it; set MLFLOW_TRACKING_URI to the MLflow server as the cluster sees it "
    "(e.g. http://HEAD_PRIVATE_IP:5000)"
)
_NO_STORAGE = (
    "no storage path given (--storage-path or train.storage_path=...): checkpoints would go to "
    "runs/ inside the job's temporary working dir, where no other node sees them and nothing "
    "survives the job"
)


def _mentions(key: str, args: list[str], files: list[Path]) -> bool:
    """True if a `key=...` override or a config/spec file sets `...key`."""
    if any(a.split("=", 1)[0].endswith(key) for a in args if "=" in a and not a.startswith("-")):
        return True
    return any(k.endswith(key) and v for f in files for k, v in _walk_keys(_load(f)))


def _load(f: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(f.read_text())
    except (OSError, yaml.YAMLError):
        return None


def storage_warnings(
    command: str, args: list[str], files: list[Path], mlflow_uri: str | None, environ
) -> list[str]:
    """Every shared-path warning of a job: its options, overrides and config/spec files, the
    MLflow URI taken from the environment, and (train, sweep) a missing MLflow store or storage
    path."""
    warnings = shared_path_warnings(args, files)
    if mlflow_uri and mlflow_uri == environ.get("MLFLOW_TRACKING_URI"):
        warnings += [w for w in [_path_problem("MLFLOW_TRACKING_URI", mlflow_uri)] if w]
    if command in ("train", "sweep"):
        if not mlflow_uri and not _mentions("mlflow_uri", args, files):
            warnings.append(_NO_MLFLOW)
        has_storage = any(a.split("=", 1)[0] == "--storage-path" for a in args)
        if not has_storage and not _mentions("storage_path", args, files):
            warnings.append(_NO_STORAGE)
    return warnings


__all__ = ["shared_path_warnings", "storage_warnings"]

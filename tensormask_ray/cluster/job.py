"""What `submit` sends: the entrypoint, the runtime environment and the metadata of one Ray job.

Code shipping. The cluster runs an environment that has tensormask-ray installed with its compiled
kernels (`tensormask_ray/_C*.so`): the image built from `cluster/Dockerfile`, or for a local head
the venv it was started from. A job then ships only the user's files, as Ray's `working_dir` (the
current directory, or `--working-dir`): configs, sweep specs, anything they reference. The
`tensormask_ray/` package itself is excluded from it: a copy in the working dir would come first
on `sys.path` and shadow the installed package, without its compiled extension (which is
gitignored, and Ray's upload honours .gitignore).

`--ship-code` is for development against a cluster whose Python/torch match this machine (a local
head, or a cluster started from an image of this checkout): the local package, compiled extension
included, is zipped here, uploaded to the cluster's package store and added as a `py_modules`
entry, which Ray puts first on every worker's `PYTHONPATH`, ahead of the installed copy.

Data, checkpoints, MLflow stores, virtualenvs, `.git` and credential-looking files are never
shipped (see `DEFAULT_EXCLUDES`). Paths the command will read or write on the cluster (storage
path, shards, checkpoints, the MLflow store) must be shared: absolute paths on a filesystem every
node mounts, or object-store URIs. A relative path would resolve inside the job's temporary copy
of the working dir on one node, so `submit` warns about each one it finds.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .. import ray_compat
from ..config import PATH_KEYS
from ..errors import UserError
from .argv import option_value

# Commands that can run as a job, and the module each entrypoint runs.
COMMANDS = {
    "train": "tensormask_ray.cli train",
    "sweep": "tensormask_ray.cli sweep",
    "evaluate": "tensormask_ray.cli evaluate",
    "data": "tensormask_ray.cli data",
    "check": "tensormask_ray.cluster.check",
}

# gitwildmatch patterns, relative to the working dir (Ray also honours .gitignore/.rayignore).
DEFAULT_EXCLUDES = [
    # the package: the cluster has it installed (or --ship-code sends it separately)
    "/tensormask_ray/",
    "/csrc/",
    "/build/",
    "/dist/",
    "*.egg-info/",
    "*.so",
    # version control, environments, caches
    ".git/",
    ".venv/",
    "venv/",
    ".tox/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    # data, checkpoints, results, tracking stores
    "/data/",
    "/datasets/",
    "/runs/",
    "/checkpoints/",
    "/ray_results/",
    "/demo_out/",
    "mlruns/",
    "mlartifacts/",
    "*.db",
    "*.parquet",
    "*.ckpt",
    "*.pt",
    "*.pth",
    "*.safetensors",
    # credentials
    ".env",
    ".env.*",
    ".netrc",
    "*.pem",
    "*.key",
    "auth_token",
    ".ray/",
    ".aws/",
    ".kube/",
]

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
# Environment variable names that look like credentials: never put in a job's runtime env,
# whose env_vars anyone who can read the dashboard can see.
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY|AUTH", re.I)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class JobSpec:
    command: str
    args: list[str]
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    working_dir: Path
    ship_code: bool
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- shipped files
def _replace(args: list[str], index: int, name: str, value: str) -> None:
    args[index] = f"{name}={value}" if args[index].startswith(name + "=") else value


def _shipped_file(path: str, cwd: Path, working_dir: Path, what: str) -> str:
    """The path to give the job for a file it must find in its working dir (relative to it)."""
    p = (cwd / path).resolve()
    if not p.is_file():
        raise UserError(f"{what} {path}: file not found")
    try:
        rel = p.relative_to(working_dir)
    except ValueError:
        raise UserError(
            f"{what} {path} is outside the working dir {working_dir} that is shipped to the cluster: "
            "run from the folder holding it, or pass --working-dir"
        ) from None
    return rel.as_posix()


def ship_file_args(
    command: str, args: list[str], cwd: Path, working_dir: Path
) -> tuple[list[str], list[Path]]:
    """Rewrites the files the command reads (`--config FILE`; the sweep's SPEC, its first
    argument) relative to the working dir, where the job finds them. Returns (args, local files)."""
    args = list(args)
    files: list[Path] = []
    for i in range(len(args)):
        value, j = option_value(args, i, "--config")
        if value is not None:
            rel = _shipped_file(value, cwd, working_dir, "--config")
            _replace(args, j, "--config", rel)
            files.append(working_dir / rel)
    if command == "sweep" and args and not args[0].startswith("-") and "=" not in args[0]:
        rel = _shipped_file(args[0], cwd, working_dir, "sweep spec")
        args[0] = rel
        files.append(working_dir / rel)
    return args, files


# ----------------------------------------------------------------------------- shared paths
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


def mlflow_passthrough(args: list[str], environ) -> str | None:
    """The MLflow tracking URI to hand to the job: the command's --mlflow-uri, else
    MLFLOW_TRACKING_URI. A URI holding credentials is refused: it would be stored with the job."""
    uri = None
    for i in range(len(args)):
        value, _ = option_value(args, i, "--mlflow-uri")
        if value is not None:
            uri = value
    uri = uri or environ.get("MLFLOW_TRACKING_URI") or None
    if uri:
        parts = urlsplit(uri)
        if parts.username or parts.password:
            raise UserError(
                "the MLflow tracking URI holds credentials, which would be stored in the job's "
                "runtime environment: give the cluster nodes MLFLOW_TRACKING_USERNAME/PASSWORD "
                "(or MLFLOW_TRACKING_TOKEN) through their own secrets instead"
            )
    return uri


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


# ----------------------------------------------------------------------------- env vars
def job_env(pairs: list[str], mlflow_uri: str | None, token=None) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    if mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--env {pair}: expected NAME=VALUE")
        name, value = pair.split("=", 1)
        if not _ENV_NAME.match(name):
            raise UserError(f"--env {name}: not a valid environment variable name")
        if _SECRET_NAME.search(name) or (token is not None and token.matches(value)):
            raise UserError(
                f"--env {name}: looks like a credential; a job's environment is stored with the job "
                "and shown by the dashboard. Give credentials to the cluster nodes (an instance role, "
                "a Kubernetes Secret, the image) instead"
            )
        env[name] = value
    return env


# ----------------------------------------------------------------------------- --ship-code
def package_zip(out_dir: Path) -> tuple[Path, dict[str, str]]:
    """Zips the local tensormask_ray package (sources, package data, compiled extension) as
    `tensormask_ray/...`, byte-identical for identical files so Ray's content-addressed upload
    is skipped when nothing changed. Returns (zip path, metadata about the build it carries)."""
    import tensormask_ray

    pkg = Path(tensormask_ray.__file__).resolve().parent
    files = sorted(
        p
        for p in pkg.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.suffix in (".py", ".yaml", ".yml", ".json", ".so")
    )
    compiled = [p.name for p in files if p.suffix == ".so"]
    path = out_dir / "tensormask_ray.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in files:
            info = zipfile.ZipInfo(
                f"tensormask_ray/{p.relative_to(pkg).as_posix()}", date_time=(1980, 1, 1, 0, 0, 0)
            )
            info.external_attr = (0o755 if p.suffix == ".so" else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, p.read_bytes())
    meta = {
        "tensormask_ray_shipped_from": "local checkout",
        "tensormask_ray_shipped_extension": ",".join(compiled) or "none",
        "tensormask_ray_shipped_python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
    return path, meta


# ----------------------------------------------------------------------------- the job
def build_job(
    command: str,
    args: list[str],
    *,
    working_dir: str | None = None,
    ship_code: bool = False,
    excludes: list[str] | None = None,
    env: list[str] | None = None,
    token=None,
    cwd: Path | None = None,
    environ=None,
) -> JobSpec:
    """Everything about the job except uploads (for --ship-code the caller uploads the package
    zip and adds its URI to `runtime_env["py_modules"]`)."""
    from .. import __version__

    if command not in COMMANDS:
        raise UserError(f"cannot submit '{command}': one of {', '.join(COMMANDS)}")
    environ = os.environ if environ is None else environ
    cwd = (cwd or Path.cwd()).resolve()
    wd = (cwd / working_dir).resolve() if working_dir else cwd
    if not wd.is_dir():
        raise UserError(f"--working-dir {working_dir}: not a folder")
    args, files = ship_file_args(command, args, cwd, wd)
    warnings = shared_path_warnings(args, files)
    mlflow_uri = mlflow_passthrough(args, environ)
    if mlflow_uri and mlflow_uri == environ.get("MLFLOW_TRACKING_URI"):
        warnings += [w for w in [_path_problem("MLFLOW_TRACKING_URI", mlflow_uri)] if w]
    if command in ("train", "sweep"):
        if not mlflow_uri and not _mentions("mlflow_uri", args, files):
            warnings.append(_NO_MLFLOW)
        has_storage = any(a.split("=", 1)[0] == "--storage-path" for a in args)
        if not has_storage and not _mentions("storage_path", args, files):
            warnings.append(_NO_STORAGE)
    all_excludes = DEFAULT_EXCLUDES + list(excludes or [])
    runtime_env: dict[str, Any] = {
        "working_dir": str(wd),
        "excludes": all_excludes,
        "env_vars": job_env(env or [], mlflow_uri, token),
    }
    metadata = {
        "tensormask_ray_command": command,
        "tensormask_ray_version": __version__,
        "tensormask_ray_code": "shipped" if ship_code else "installed",
    }
    entrypoint = f"python -m {COMMANDS[command]} {shlex.join(args)}".strip()
    if token is not None and (token.matches(entrypoint) or any(token.matches(a) for a in args)):
        raise UserError(
            "the command line holds the cluster's authentication token: refusing to submit it"
        )
    return JobSpec(command, args, entrypoint, runtime_env, metadata, wd, ship_code, warnings)


def shipped_files(working_dir: Path, excludes: list[str]) -> list[Path]:
    """The files Ray will upload as the working dir (Ray's own traversal: its default excludes,
    ours, and every .gitignore/.rayignore unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1)."""
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    return ray_compat.working_dir_files(working_dir, excludes, include_gitignore)


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="tensormask-submit-")


__all__ = [
    "COMMANDS",
    "DEFAULT_EXCLUDES",
    "JobSpec",
    "build_job",
    "job_env",
    "package_zip",
    "ship_file_args",
    "shipped_files",
]

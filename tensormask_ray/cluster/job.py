"""What `submit` sends: the entrypoint, the runtime environment and the metadata of one Ray job.

The parts have their own modules: the files shipped as the working dir (`working_dir.py`), the
warnings about paths the cluster cannot share (`shared_paths.py`), the job's environment variables
(`job_env.py`) and, for `--ship-code`, the zipped package (`code_package.py`).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .job_env import job_env, mlflow_passthrough
from .shared_paths import storage_warnings
from .working_dir import DEFAULT_EXCLUDES, ship_file_args

# Commands that can run as a job, and the module each entrypoint runs.
COMMANDS = {
    "train": "tensormask_ray.cli train",
    "sweep": "tensormask_ray.cli sweep",
    "evaluate": "tensormask_ray.cli evaluate",
    "data": "tensormask_ray.cli data",
    "check": "tensormask_ray.cluster.check",
}


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
    mlflow_uri = mlflow_passthrough(args, environ)
    warnings = storage_warnings(command, args, files, mlflow_uri, environ)
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


__all__ = ["COMMANDS", "JobSpec", "build_job"]

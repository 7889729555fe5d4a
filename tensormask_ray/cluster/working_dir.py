"""What a job ships as Ray's `working_dir`: the user's files (configs, sweep specs, anything they
reference), never the package, data, checkpoints, environments or credentials.

The cluster runs an environment that has tensormask-ray installed with its compiled kernels
(`tensormask_ray/_C*.so`): the image built from `cluster/Dockerfile`, or for a local head the venv
it was started from. The `tensormask_ray/` package itself is excluded from the working dir: a copy
there would come first on `sys.path` and shadow the installed package, without its compiled
extension (which is gitignored, and Ray's upload honours .gitignore). `--ship-code` sends the
package separately (`code_package.py`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import ray_compat
from ..errors import UserError
from .argv import option_value

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
    "/logs/",  # the commands' own log files (console.py's default folder)
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


def shipped_files(working_dir: Path, excludes: list[str]) -> list[Path]:
    """The files Ray will upload as the working dir (Ray's own traversal: its default excludes,
    ours, and every .gitignore/.rayignore unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1)."""
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    return ray_compat.working_dir_files(working_dir, excludes, include_gitignore)


__all__ = ["DEFAULT_EXCLUDES", "ship_file_args", "shipped_files"]

"""The one home of every private Ray internal the project uses.

Ray gives no public way to do these few things, so the project reaches into its internals. Each
accessor here checks, every time it is used, that the installed Ray is a version it was written
and tested for (`TESTED_RAY`, read from `ray.__version__`) and that the internal is still there
in the shape it expects; otherwise it raises `RayInternalsError` naming the internal and the Ray
version, rather than falling back to something silently different. `tests/test_ray_compat.py`
exercises each accessor against the installed Ray. Moving to a new Ray: check each internal
below in that Ray's source, then add its (major, minor) to `TESTED_RAY`.

- `execution_index`: Ray Data's `DataContext._execution_idx` (the epoch of the training
  augmentation, `data.dataset`).
- `asha_*`: `ASHAScheduler`'s `_time_attr`, `_metric`, `_metric_op`, `_trial_info`,
  `_brackets[i]._rungs` (the resumable scheduler, `tune.scheduler`), and a Tune trial's
  `storage.storage_filesystem` (`ray.train._internal.storage.StorageContext`).
- `working_dir_files`: `ray._private.runtime_env.packaging._dir_travel` / `_get_excludes` and
  `ray._private.ray_constants.get_runtime_env_default_excludes` (what a job's working dir ships,
  `cluster.working_dir`).
- `upload_package_file`: `JobSubmissionClient._upload_package_if_needed` (`submit --ship-code`).
- `RUNTIME_ENV_LOGGERS`: the names of `ray._private.runtime_env`'s loggers (`cluster.client`
  quiets them).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The Ray versions, (major, minor), whose internals the accessors were checked against.
TESTED_RAY: tuple[tuple[int, int], ...] = ((2, 60),)

# Loggers of Ray's runtime-env packaging (module names under ray._private).
RUNTIME_ENV_PACKAGING = "ray._private.runtime_env.packaging"
RUNTIME_ENV_WORKING_DIR = "ray._private.runtime_env.working_dir"
RUNTIME_ENV_LOGGERS = (RUNTIME_ENV_PACKAGING, RUNTIME_ENV_WORKING_DIR)


class RayInternalsError(Exception):
    """A private Ray internal the project relies on is missing or changed, or this Ray version
    is not one the accessor was written for. Not a RuntimeError, so that no handler of Ray's own
    errors (which are often RuntimeErrors) takes it for something else."""


@functools.lru_cache(maxsize=1)
def ray_version() -> tuple[str, tuple[int, int] | None]:
    """(ray.__version__, its (major, minor), or None when it does not parse)."""
    import ray

    text = str(ray.__version__)
    m = re.match(r"(\d+)\.(\d+)", text)
    return text, ((int(m.group(1)), int(m.group(2))) if m else None)


def _tested() -> str:
    return ", ".join(f"{a}.{b}.x" for a, b in TESTED_RAY)


def _fail(internal: str, problem: str) -> RayInternalsError:
    text, _ = ray_version()
    return RayInternalsError(
        f"Ray internal {internal}: {problem} (installed Ray {text}; tensormask_ray was written "
        f"against Ray {_tested()}: see tensormask_ray/ray_compat.py)"
    )


def _check_version(internal: str) -> None:
    text, major_minor = ray_version()
    if major_minor not in TESTED_RAY:
        raise _fail(internal, f"not checked for Ray {text}")


def _attribute(obj: Any, name: str, internal: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise _fail(internal, f"{type(obj).__name__} has no attribute {name!r}") from None


# ----------------------------------------------------------------------------- Ray Data
def execution_index(context: Any = None) -> int:
    """The number of the current execution of a dataset, `DataContext._execution_idx` (0 for the
    first pass over it, 1 for the second, ...), of `context` or the current DataContext."""
    internal = "ray.data.DataContext._execution_idx"
    _check_version(internal)
    if context is None:
        from ray.data import DataContext

        context = DataContext.get_current()
    value = _attribute(context, "_execution_idx", internal)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(internal, f"is a {type(value).__name__}, not an int")
    return value


# ----------------------------------------------------------------------------- Tune's ASHA
def asha_result_keys(scheduler: Any) -> tuple[str, str, float]:
    """(time attribute, metric, metric sign: +1 when higher is better) of an ASHAScheduler."""
    internal = "ray.tune.schedulers.ASHAScheduler._time_attr/_metric/_metric_op"
    _check_version(internal)
    time_attr = _attribute(scheduler, "_time_attr", internal)
    metric = _attribute(scheduler, "_metric", internal)
    op = _attribute(scheduler, "_metric_op", internal)
    if not isinstance(time_attr, str) or not isinstance(metric, str) or op not in (1.0, -1.0):
        raise _fail(internal, f"unexpected values {time_attr!r}, {metric!r}, {op!r}")
    return time_attr, metric, float(op)


def asha_bracket(scheduler: Any, trial_id: str) -> Any:
    """The bracket (`ray.tune.schedulers.async_hyperband._Bracket`) a trial was added to."""
    internal = "ray.tune.schedulers.ASHAScheduler._trial_info"
    _check_version(internal)
    info = _attribute(scheduler, "_trial_info", internal)
    if not isinstance(info, dict):
        raise _fail(internal, f"is a {type(info).__name__}, not a dict of trial id -> bracket")
    bracket = info[trial_id]
    if not callable(getattr(bracket, "on_result", None)):
        raise _fail(internal, f"its bracket {type(bracket).__name__} has no on_result()")
    return bracket


def asha_rungs(scheduler: Any, bracket: int = 0) -> list[tuple[float, dict[str, float]]]:
    """[(milestone, {trial id: recorded value (sign: higher is better)})] of one bracket,
    highest milestone first (`ASHAScheduler._brackets[bracket]._rungs`)."""
    internal = "ray.tune.schedulers.ASHAScheduler._brackets[i]._rungs"
    _check_version(internal)
    brackets = _attribute(scheduler, "_brackets", internal)
    rungs = _attribute(brackets[bracket], "_rungs", internal)
    out = []
    for rung in rungs:
        if not (isinstance(rung, tuple) and len(rung) == 2 and isinstance(rung[1], dict)):
            raise _fail(internal, f"a rung is {rung!r}, not (milestone, {{trial id: value}})")
        out.append((rung[0], dict(rung[1])))
    return out


def trial_filesystem(trial: Any) -> Any:
    """The pyarrow filesystem of a Tune trial's storage (`trial.storage.storage_filesystem`);
    the trial's folder on it is the public `trial.path`."""
    internal = "ray.tune.experiment.Trial.storage.storage_filesystem"
    _check_version(internal)
    storage = _attribute(trial, "storage", internal)
    fs = _attribute(storage, "storage_filesystem", internal)
    if not callable(getattr(fs, "open_input_stream", None)):
        raise _fail(internal, f"is a {type(fs).__name__}, not a pyarrow filesystem")
    return fs


# ----------------------------------------------------------------------------- runtime env / jobs
def _packaging() -> tuple[Callable, Callable, Callable]:
    internal = (
        f"{RUNTIME_ENV_PACKAGING}._dir_travel/_get_excludes, "
        "ray._private.ray_constants.get_runtime_env_default_excludes"
    )
    _check_version(internal)
    try:
        packaging = importlib.import_module(RUNTIME_ENV_PACKAGING)
        constants = importlib.import_module("ray._private.ray_constants")
    except ImportError as e:
        raise _fail(internal, f"cannot be imported ({e})") from None
    dir_travel = _attribute(packaging, "_dir_travel", internal)
    get_excludes = _attribute(packaging, "_get_excludes", internal)
    default_excludes = _attribute(constants, "get_runtime_env_default_excludes", internal)
    params = list(inspect.signature(dir_travel).parameters)
    if params[:3] != ["path", "excludes", "handler"] or "include_gitignore" not in params:
        raise _fail(
            internal,
            f"_dir_travel takes {params}, not (path, excludes, handler, include_gitignore)",
        )
    return dir_travel, get_excludes, default_excludes


def working_dir_files(
    working_dir: Path, excludes: list[str], include_gitignore: bool
) -> list[Path]:
    """The files Ray uploads as a job's working dir, relative to it and sorted: Ray's own
    traversal with its default excludes, `excludes`, and (if `include_gitignore`) every
    .gitignore/.rayignore on the way."""
    dir_travel, get_excludes, default_excludes = _packaging()
    found: list[Path] = []
    rules = [get_excludes(working_dir, list(default_excludes()) + list(excludes))]

    def handler(p: Path) -> None:
        if p.is_file():
            found.append(p.relative_to(working_dir))

    dir_travel(working_dir, rules, handler, include_gitignore=include_gitignore)
    return sorted(found)


def upload_package_file(sdk: Any, path: str) -> str:
    """Uploads a zip file to the cluster's package store through a `JobSubmissionClient`
    (`_upload_package_if_needed(path, include_gitignore=False, is_file=True)`); its gcs:// URI."""
    internal = "ray.job_submission.JobSubmissionClient._upload_package_if_needed"
    _check_version(internal)
    upload = _attribute(sdk, "_upload_package_if_needed", internal)
    params = inspect.signature(upload).parameters
    if not {"package_path", "include_gitignore", "is_file"} <= set(params):
        raise _fail(
            internal, f"takes {list(params)}, not (package_path, include_gitignore, is_file)"
        )
    return upload(path, include_gitignore=False, is_file=True)


def runtime_env_loggers() -> tuple[str, ...]:
    """`RUNTIME_ENV_LOGGERS`, checked to still name modules of this Ray (a logger of a module
    that is gone would be quieted to no effect)."""
    internal = "ray._private.runtime_env loggers " + ", ".join(RUNTIME_ENV_LOGGERS)
    _check_version(internal)
    for name in RUNTIME_ENV_LOGGERS:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise _fail(internal, f"{name} cannot be imported ({e})") from None
    return RUNTIME_ENV_LOGGERS


__all__ = [
    "RUNTIME_ENV_LOGGERS",
    "RayInternalsError",
    "TESTED_RAY",
    "asha_bracket",
    "asha_result_keys",
    "asha_rungs",
    "execution_index",
    "ray_version",
    "runtime_env_loggers",
    "trial_filesystem",
    "upload_package_file",
    "working_dir_files",
]

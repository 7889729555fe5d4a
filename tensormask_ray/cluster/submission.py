"""Submitting one tensormask-ray command as a Ray job: the job server's address and token
resolved, the job built (`job.py`), this checkout's package uploaded for `ship_code`, the job
submitted through the Jobs SDK (`client.py`) and, unless `wait=False`, its logs followed to the
end and its final status read back.

Progress and warnings go to `say` (by default stderr, the lines `tensormask-ray submit` prints);
the followed job's own log goes to stdout, whole. A dry run resolves everything, submits nothing
and returns what would be sent (`SubmitResult.dry_run`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .auth import Token, cleartext_warning, resolve_token
from .client import CONNECT_TIMEOUT_S, JobClient, resolve_address
from .code_package import package_zip, temp_dir
from .job import JobSpec, build_job
from .working_dir import shipped_files

_NO_PACKAGE = "No module named 'tensormask_ray'"


def say_on_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class SubmitResult:
    """A submitted (or, for a dry run, only described) job."""

    address: str  # the job server it went to
    entrypoint: str
    submission_id: str | None = None  # None for a dry run
    status: str | None = None  # final status when followed to the end; None otherwise
    message: str = ""  # the job's final message (redacted)
    interrupted: bool = False  # following stopped (Ctrl-C); the job goes on
    dry_run: dict[str, Any] | None = field(default=None)  # what would be sent, token hidden

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"


def _dry_run_view(spec: JobSpec, address: str, token: Token | None) -> dict[str, Any]:
    """The job as a dry run shows it: everything but the token's value, and the shipped files."""
    files = shipped_files(spec.working_dir, spec.runtime_env["excludes"])
    return {
        "address": address,
        "token": f"from {token.source}" if token else None,
        "entrypoint": spec.entrypoint,
        "runtime_env": spec.runtime_env,
        "metadata": spec.metadata,
        "ship_code": spec.ship_code,
        "shipped_files": [str(f) for f in files],
    }


def submit_job(
    command: str,
    args: Sequence[str] = (),
    *,
    address: str | None = None,
    token_file: str | None = None,
    working_dir: str | None = None,
    excludes: Sequence[str] = (),
    env: Sequence[str] = (),
    ship_code: bool = False,
    submission_id: str | None = None,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    wait: bool = True,
    dry_run: bool = False,
    say: Callable[[str], None] = say_on_stderr,
) -> SubmitResult:
    """`command` (train, sweep, evaluate, data, check) with its own `args` as a Ray job on the
    cluster whose job server is `address`; `env` holds NAME=VALUE strings for the job."""
    address = resolve_address(address)
    token = resolve_token(token_file, address)
    spec = build_job(
        command,
        list(args),
        working_dir=working_dir,
        ship_code=ship_code,
        excludes=list(excludes),
        env=list(env),
        token=token,
    )
    for w in spec.warnings + [cleartext_warning(address, token)]:
        if w:
            say(f"tensormask-ray submit: warning: {w}")
    if dry_run:
        return SubmitResult(address, spec.entrypoint, dry_run=_dry_run_view(spec, address, token))

    client = JobClient(address, token, connect_timeout)
    if token is not None:
        say(f"[submit] authenticating to {address} with the token from {token.source}")
    runtime_env = dict(spec.runtime_env)
    metadata = dict(spec.metadata)
    if spec.ship_code:
        with temp_dir() as tmp:
            zip_path, meta = package_zip(Path(tmp))
            runtime_env["py_modules"] = [client.upload_package_file(str(zip_path))]
            metadata.update(meta)
        extension = metadata["tensormask_ray_shipped_extension"]
        say(f"[submit] shipping this checkout's tensormask_ray ({extension})")
    say(f"[submit] shipping the working dir {spec.working_dir} (see --dry-run for its files)")
    job_id = client.submit(
        entrypoint=spec.entrypoint,
        runtime_env=runtime_env,
        metadata=metadata,
        submission_id=submission_id,
    )
    if not wait:
        return SubmitResult(address, spec.entrypoint, job_id)
    return _follow(client, job_id, spec.entrypoint, say)


def _follow(client: JobClient, job_id: str, entrypoint: str, say) -> SubmitResult:
    """The job's logs to stdout until it ends, then its final status and message."""
    address = client.address
    say(f"[submit] job {job_id} submitted to {address}: {entrypoint}")
    say(
        "[submit] following its logs; Ctrl-C stops following, not the job "
        f"(tensormask-ray jobs stop {job_id})"
    )
    try:
        status = client.follow(job_id)
    except KeyboardInterrupt:
        say(
            f"[submit] stopped following; job {job_id} goes on: "
            f"tensormask-ray jobs logs {job_id} --follow"
        )
        return SubmitResult(address, entrypoint, job_id, interrupted=True)
    message = client.redact(client.info(job_id).message or "")
    say(f"[submit] job {job_id} {status}" + (f": {message}" if message else ""))
    if status == "FAILED" and _NO_PACKAGE in client.logs(job_id):
        say(
            "[submit] hint: the cluster has no tensormask_ray installed: start it from the image "
            "built with cluster/Dockerfile, or (same Python/torch as here) pass --ship-code"
        )
    return SubmitResult(address, entrypoint, job_id, status, message)


__all__ = ["SubmitResult", "say_on_stderr", "submit_job"]

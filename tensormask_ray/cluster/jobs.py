"""The Ray jobs of a cluster, for `tensormask-ray jobs` and the API: connecting with the same
address and token handling as `submit` (`connect`), then listing them, one job's record, its
logs (whole, or followed to the end), and stopping one and waiting until it has stopped.

Every text that comes back from the cluster (messages, entrypoints, metadata, logs) is redacted
with the token, which is never returned or printed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UserError
from .auth import cleartext_warning, resolve_token
from .client import CONNECT_TIMEOUT_S, TERMINAL, JobClient, resolve_address
from .submission import say_on_stderr

STOP_TIMEOUT_S = 60.0  # how long `stop` waits for a job to reach a final status


@dataclass(frozen=True)
class JobInfo:
    """One job as the Jobs SDK reports it (Ray's JobDetails), its texts redacted."""

    submission_id: str
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED
    message: str
    entrypoint: str
    start_time: int | None  # ms since the epoch, as Ray gives it
    end_time: int | None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobList:
    """The jobs submitted to the job server at `address`, newest first."""

    address: str
    jobs: tuple[JobInfo, ...]


@dataclass(frozen=True)
class JobLogs:
    """A job's logs: the text so far, or (followed) streamed to stdout and the final status."""

    submission_id: str
    text: str | None  # None when followed: the logs went to stdout as they came
    status: str | None  # the final status when followed; None otherwise


@dataclass(frozen=True)
class StopResult:
    """A job asked to stop (or found already ended) and its final status."""

    submission_id: str
    status: str
    already_ended: bool  # it had ended before the request; nothing was stopped


def connect(
    address: str | None = None,
    token_file: str | None = None,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    say: Callable[[str], None] = say_on_stderr,
) -> JobClient:
    """The client of the job server at `address` (see client.resolve_address) with the token of
    auth.resolve_token; a token sent in clear beyond this machine is warned about through `say`."""
    address = resolve_address(address)
    token = resolve_token(token_file, address)
    warning = cleartext_warning(address, token)
    if warning:
        say(f"tensormask-ray jobs: warning: {warning}")
    return JobClient(address, token, connect_timeout)


def _info(job, redact: Callable[[str], str]) -> JobInfo:
    return JobInfo(
        submission_id=job.submission_id or job.job_id or "?",
        status=str(job.status.value),
        message=redact(job.message or ""),
        entrypoint=redact(job.entrypoint or ""),
        start_time=job.start_time,
        end_time=job.end_time,
        metadata={k: redact(str(v)) for k, v in (job.metadata or {}).items()},
    )


def list_jobs(client: JobClient) -> JobList:
    """Every submitted job (not the drivers Ray lists beside them), newest first."""
    jobs = sorted(client.list(), key=lambda j: j.start_time or 0, reverse=True)
    return JobList(client.address, tuple(_info(j, client.redact) for j in jobs if j.submission_id))


def job_status(client: JobClient, submission_id: str) -> JobInfo:
    return _info(client.info(submission_id), client.redact)


def job_logs(client: JobClient, submission_id: str, follow: bool = False) -> JobLogs:
    """The logs so far; or, with `follow`, streamed to stdout until the job ends."""
    if follow:
        return JobLogs(submission_id, None, client.follow(submission_id))
    return JobLogs(submission_id, client.logs(submission_id), None)


def stop_job(client: JobClient, submission_id: str, timeout: float = STOP_TIMEOUT_S) -> StopResult:
    """Asks Ray to stop the job and waits up to `timeout` seconds for a final status; a job
    that is still going then is a UserError."""
    status = client.status(submission_id)
    if status in TERMINAL:
        return StopResult(submission_id, status, already_ended=True)
    client.stop(submission_id)
    status = client.wait(submission_id, timeout)
    if status not in TERMINAL:
        raise UserError(
            f"job {submission_id} is still {status} after {timeout:g} s; try again, or check "
            "the head"
        )
    return StopResult(submission_id, status, already_ended=False)


__all__ = [
    "STOP_TIMEOUT_S",
    "JobInfo",
    "JobList",
    "JobLogs",
    "StopResult",
    "connect",
    "job_logs",
    "job_status",
    "list_jobs",
    "stop_job",
]

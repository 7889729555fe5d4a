"""`tensormask-ray jobs list|status|logs|stop [ID]`: the Ray jobs of a cluster, through the same
address and token handling as `submit` (`--address`, `--token-file`; the token is never printed).

- `list`: every job, newest first: id, status, command, start time.
- `status ID`: status, message, times, entrypoint and metadata.
- `logs ID [--follow]`: the logs so far, or streamed until the job ends.
- `stop ID`: asks Ray to stop the job and waits (`--timeout`) until it is STOPPED (or ended).

This module parses and prints; the work is the API's (`api.list_jobs`, `job_status`, `job_logs`,
`stop_job`, over `jobs.py`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from ..errors import UserError
from .cli import add_common
from .jobs import STOP_TIMEOUT_S, JobInfo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "List, inspect, follow and stop the Ray jobs of a cluster."
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_common(common)
    sub.add_parser("list", parents=[common], help="all jobs, newest first").add_argument(
        "--json", action="store_true", help="machine-readable output"
    )
    st = sub.add_parser("status", parents=[common], help="status, message and metadata of a job")
    st.add_argument("job_id", metavar="ID")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    lg = sub.add_parser("logs", parents=[common], help="the logs of a job")
    lg.add_argument("job_id", metavar="ID")
    lg.add_argument("-f", "--follow", action="store_true", help="stream them until the job ends")
    sp = sub.add_parser("stop", parents=[common], help="stop a job and wait until it has stopped")
    sp.add_argument("job_id", metavar="ID")
    sp.add_argument(
        "--timeout",
        type=float,
        default=STOP_TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for it to stop (default {STOP_TIMEOUT_S:g})",
    )


def _time(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _view(job: JobInfo) -> dict:
    return {
        "id": job.submission_id,
        "status": job.status,
        "message": job.message,
        "entrypoint": job.entrypoint,
        "start_time": _time(job.start_time),
        "end_time": _time(job.end_time),
        "metadata": dict(job.metadata),
    }


def run(args: argparse.Namespace) -> int:
    from .. import api

    where = {
        "address": args.address,
        "token_file": args.token_file,
        "connect_timeout": args.connect_timeout,
    }
    if args.action == "list":
        listed = api.list_jobs(**where)
        views = [_view(j) for j in listed.jobs]
        if args.json:
            print(json.dumps(views, indent=2))
            return 0
        if not views:
            print(f"no jobs on {listed.address}")
            return 0
        print(f"{'ID':<30} {'STATUS':<10} {'STARTED':<19}  COMMAND")
        for v in views:
            command = v["metadata"].get("tensormask_ray_command") or v["entrypoint"][:60]
            print(f"{v['id']:<30} {v['status']:<10} {v['start_time']:<19}  {command}")
        return 0
    if args.action == "status":
        view = _view(api.job_status(args.job_id, **where))
        if args.json:
            print(json.dumps(view, indent=2))
            return 0
        for key, value in view.items():
            if key == "metadata":
                value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
            print(f"{key + ':':<12} {value}")
        return 0
    if args.action == "logs":
        logs = api.job_logs(args.job_id, follow=args.follow, **where)
        if args.follow:
            print(f"[jobs] job {args.job_id} {logs.status}", file=sys.stderr)
        else:
            from ..console import unrouted_stdout

            out = unrouted_stdout()  # the job's log, whole
            out.write(logs.text)
            out.flush()
        return 0
    if args.action == "stop":
        stopped = api.stop_job(args.job_id, timeout=args.timeout, **where)
        if stopped.already_ended:
            print(f"job {args.job_id} already ended: {stopped.status}")
        else:
            print(f"job {args.job_id} {stopped.status}")
        return 0
    raise UserError(f"unknown action {args.action}")


__all__ = ["add_arguments", "run"]

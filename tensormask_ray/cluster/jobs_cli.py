"""`tensormask-ray jobs list|status|logs|stop [ID]`: the Ray jobs of a cluster, through the same
address and token handling as `submit` (`--address`, `--token-file`; the token is never printed).

- `list`: every job, newest first: id, status, command, start time.
- `status ID`: status, message, times, entrypoint and metadata.
- `logs ID [--follow]`: the logs so far, or streamed until the job ends.
- `stop ID`: asks Ray to stop the job and waits (`--timeout`) until it is STOPPED (or ended).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from ..errors import UserError
from .auth import cleartext_warning, resolve_token
from .cli import add_common
from .client import TERMINAL, JobClient, resolve_address


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
        default=60.0,
        metavar="S",
        help="seconds to wait for it to stop (default 60)",
    )


def _time(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _job_id(info) -> str:
    return info.submission_id or info.job_id or "?"


def _view(info, redact) -> dict:
    return {
        "id": _job_id(info),
        "status": str(info.status.value),
        "message": redact(info.message or ""),
        "entrypoint": redact(info.entrypoint or ""),
        "start_time": _time(info.start_time),
        "end_time": _time(info.end_time),
        "metadata": {k: redact(str(v)) for k, v in (info.metadata or {}).items()},
    }


def run(args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    token = resolve_token(args.token_file, address)
    warning = cleartext_warning(address, token)
    if warning:
        print(f"tensormask-ray jobs: warning: {warning}", file=sys.stderr)
    client = JobClient(address, token, args.connect_timeout)
    if args.action == "list":
        jobs = sorted(client.list(), key=lambda j: j.start_time or 0, reverse=True)
        views = [_view(j, client.redact) for j in jobs if j.submission_id]  # drivers of jobs only
        if args.json:
            print(json.dumps(views, indent=2))
            return 0
        if not views:
            print(f"no jobs on {address}")
            return 0
        print(f"{'ID':<30} {'STATUS':<10} {'STARTED':<19}  COMMAND")
        for v in views:
            command = v["metadata"].get("tensormask_ray_command") or v["entrypoint"][:60]
            print(f"{v['id']:<30} {v['status']:<10} {v['start_time']:<19}  {command}")
        return 0
    if args.action == "status":
        view = _view(client.info(args.job_id), client.redact)
        if args.json:
            print(json.dumps(view, indent=2))
            return 0
        for key, value in view.items():
            if key == "metadata":
                value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
            print(f"{key + ':':<12} {value}")
        return 0
    if args.action == "logs":
        if args.follow:
            status = client.follow(args.job_id)
            print(f"[jobs] job {args.job_id} {status}", file=sys.stderr)
        else:
            from ..console import unrouted_stdout

            out = unrouted_stdout()  # the job's log, whole
            out.write(client.logs(args.job_id))
            out.flush()
        return 0
    if args.action == "stop":
        status = client.status(args.job_id)
        if status in TERMINAL:
            print(f"job {args.job_id} already ended: {status}")
            return 0
        client.stop(args.job_id)
        status = client.wait(args.job_id, args.timeout)
        if status not in TERMINAL:
            raise UserError(
                f"job {args.job_id} is still {status} after {args.timeout:g} s; try again, or check the head"
            )
        print(f"job {args.job_id} {status}")
        return 0
    raise UserError(f"unknown action {args.action}")


__all__ = ["add_arguments", "run"]

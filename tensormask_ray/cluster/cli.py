"""`tensormask-ray submit COMMAND [ARGS...] --address http://HEAD:8265`: runs the same CLI command
(`train`, `sweep`, `evaluate`, `data`, or `check`) as a Ray job through the Ray Jobs SDK.

Submit's own options may come anywhere on the line; everything else is the command's, passed on
unchanged (except the files it reads, `--config FILE` and a sweep's SPEC, whose paths are made
relative to the shipped working dir). Prints the job id, then follows the job's logs until it
ends (exit 0 if it SUCCEEDED, 1 otherwise) unless `--no-wait`, which prints only the job id on
stdout. This module parses and prints: the work is `api.submit` (`submission.py`); see `job.py`
(and the modules it names) for what is shipped and `auth.py` for the token.
"""

from __future__ import annotations

import argparse
import importlib
import json

from ..errors import UserError
from .argv import option_value
from .client import CONNECT_TIMEOUT_S
from .job import COMMANDS
from .submission import say_on_stderr

# submit's options: name -> (takes a value, repeatable)
_OWN = {
    "--address": (True, False),
    "--token-file": (True, False),
    "--working-dir": (True, False),
    "--exclude": (True, True),
    "--env": (True, True),
    "--submission-id": (True, False),
    "--connect-timeout": (True, False),
    "--no-wait": (False, False),
    "--ship-code": (False, False),
    "--dry-run": (False, False),
}


def add_common(p: argparse.ArgumentParser) -> None:
    """--address and --token-file, shared with `jobs`."""
    p.add_argument(
        "--address",
        help="the head's job server, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS)",
    )
    p.add_argument(
        "--token-file",
        metavar="PATH",
        help="file holding the cluster's auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, "
        "and for a job server on this machine ~/.ray/auth_token)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT_S,
        metavar="S",
        help=f"seconds to wait for the job server to answer (default {CONNECT_TIMEOUT_S:g})",
    )


def _add_own(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument(
        "--no-wait", action="store_true", help="print the job id and return; do not follow the logs"
    )
    p.add_argument(
        "--working-dir", metavar="DIR", help="folder shipped as the job's working dir (default: .)"
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="more gitignore-style patterns not to ship",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the job (no credentials)",
    )
    p.add_argument(
        "--ship-code",
        action="store_true",
        help="also ship this checkout's tensormask_ray (with its compiled kernels); for clusters matching this machine",
    )
    p.add_argument("--submission-id", help="the job id to use (default: one Ray makes up)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the entrypoint, runtime env and shipped files; submit nothing",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run a tensormask-ray command (train, sweep, evaluate, data, check) as a Ray job on a "
        "cluster. Submit's options may come before or after the command's own arguments."
    )
    p.allow_abbrev = False
    _add_own(p)
    p.add_argument(
        "job_command",
        metavar="COMMAND",
        choices=list(COMMANDS),
        help=f"one of: {', '.join(COMMANDS)}",
    )
    p.add_argument(
        "job_args", nargs=argparse.REMAINDER, metavar="ARGS", help="the command's own arguments"
    )


def split_args(tokens: list[str]) -> tuple[list[str], list[str]]:
    """(submit's own option tokens, the command's tokens), order kept in each."""
    own, rest = [], []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        name = tok.split("=", 1)[0]
        if name not in _OWN:
            rest.append(tok)
            i += 1
            continue
        end = i
        if _OWN[name][0]:  # takes a value: `name VALUE` or `name=VALUE`
            value, end = option_value(tokens, i, name)
            if value is None:
                raise UserError(f"{name} needs a value")
        own += tokens[i : end + 1]
        i = end + 1
    return own, rest


def _merge(args: argparse.Namespace, own_tokens: list[str]) -> argparse.Namespace:
    """Options given after COMMAND override/extend those given before it."""
    if not own_tokens:
        return args
    p = argparse.ArgumentParser(prog="tensormask-ray submit", allow_abbrev=False)
    _add_own(p)
    late = p.parse_args(own_tokens)
    for name, (_, repeatable) in _OWN.items():
        dest = name[2:].replace("-", "_")
        value, default = getattr(late, dest), p.get_default(dest)
        if repeatable:
            setattr(args, dest, list(getattr(args, dest) or []) + list(value))
        elif value != default:
            setattr(args, dest, value)
    return args


def _command_help(command: str) -> int:
    if command == "check":
        from .check import main

        return main(["--help"])
    from .. import cli as front

    module = importlib.import_module(front.COMMANDS[command][0])
    p = argparse.ArgumentParser(
        prog=f"tensormask-ray submit {command}",
        epilog="On the cluster the job joins the cluster it runs on: submit takes --address itself.",
    )
    module.add_arguments(p)
    p.print_help()
    return 0


def run(args: argparse.Namespace) -> int:
    from ..api import submit

    own, rest = split_args(list(args.job_args))
    args = _merge(args, own)
    command = args.job_command
    if "-h" in rest or "--help" in rest:
        return _command_help(command)
    result = submit(
        command,
        rest,
        address=args.address,
        token_file=args.token_file,
        working_dir=args.working_dir,
        excludes=args.exclude,
        env_vars=args.env,
        ship_code=args.ship_code,
        submission_id=args.submission_id,
        connect_timeout=args.connect_timeout,
        wait=not args.no_wait,
        dry_run=args.dry_run,
    )
    if result.dry_run is not None:
        print(json.dumps(result.dry_run, indent=2))
        return 0
    job_id, address = result.submission_id, result.address
    if args.no_wait:
        print(job_id, flush=True)
        say_on_stderr(f"[submit] job {job_id} submitted to {address}")
        say_on_stderr(
            f"[submit] follow it: tensormask-ray jobs logs {job_id} --follow --address {address}"
        )
        return 0
    if result.interrupted:
        return 130
    return 0 if result.succeeded else 1


__all__ = ["add_arguments", "add_common", "run", "split_args"]

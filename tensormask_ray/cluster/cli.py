"""`tensormask-ray submit COMMAND [ARGS...] --address http://HEAD:8265`: runs the same CLI command
(`train`, `sweep`, `evaluate`, `data`, or `check`) as a Ray job through the Ray Jobs SDK.

Submit's own options may come anywhere on the line; everything else is the command's, passed on
unchanged (except the files it reads, `--config FILE` and a sweep's SPEC, whose paths are made
relative to the shipped working dir). Prints the job id, then follows the job's logs until it
ends (exit 0 if it SUCCEEDED, 1 otherwise) unless `--no-wait`, which prints only the job id on
stdout. See `job.py` (and the modules it names) for what is shipped and `auth.py` for the token.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from ..errors import UserError
from .argv import option_value
from .auth import cleartext_warning, resolve_token
from .client import CONNECT_TIMEOUT_S, JobClient, resolve_address
from .code_package import package_zip, temp_dir
from .job import COMMANDS, build_job
from .working_dir import shipped_files

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


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    own, rest = split_args(list(args.job_args))
    args = _merge(args, own)
    command = args.job_command
    if "-h" in rest or "--help" in rest:
        return _command_help(command)
    address = resolve_address(args.address)
    token = resolve_token(args.token_file, address)
    spec = build_job(
        command,
        rest,
        working_dir=args.working_dir,
        ship_code=args.ship_code,
        excludes=args.exclude,
        env=args.env,
        token=token,
    )
    for w in spec.warnings + [cleartext_warning(address, token)]:
        if w:
            _say(f"tensormask-ray submit: warning: {w}")
    if args.dry_run:
        return _dry_run(spec, address, token)

    client = JobClient(address, token, args.connect_timeout)
    if token is not None:
        _say(f"[submit] authenticating to {address} with the token from {token.source}")
    runtime_env = dict(spec.runtime_env)
    metadata = dict(spec.metadata)
    if spec.ship_code:
        with temp_dir() as tmp:
            zip_path, meta = package_zip(Path(tmp))
            runtime_env["py_modules"] = [client.upload_package_file(str(zip_path))]
            metadata.update(meta)
        _say(
            f"[submit] shipping this checkout's tensormask_ray ({metadata['tensormask_ray_shipped_extension']})"
        )
    _say(f"[submit] shipping the working dir {spec.working_dir} (see --dry-run for its files)")
    job_id = client.submit(
        entrypoint=spec.entrypoint,
        runtime_env=runtime_env,
        metadata=metadata,
        submission_id=args.submission_id,
    )
    if args.no_wait:
        print(job_id, flush=True)
        _say(f"[submit] job {job_id} submitted to {address}")
        _say(f"[submit] follow it: tensormask-ray jobs logs {job_id} --follow --address {address}")
        return 0
    _say(f"[submit] job {job_id} submitted to {address}: {spec.entrypoint}")
    _say(
        f"[submit] following its logs; Ctrl-C stops following, not the job (tensormask-ray jobs stop {job_id})"
    )
    try:
        status = client.follow(job_id)
    except KeyboardInterrupt:
        _say(
            f"[submit] stopped following; job {job_id} goes on: tensormask-ray jobs logs {job_id} --follow"
        )
        return 130
    info = client.info(job_id)
    message = client.redact(info.message or "")
    _say(f"[submit] job {job_id} {status}" + (f": {message}" if message else ""))
    if status == "FAILED" and "No module named 'tensormask_ray'" in client.logs(job_id):
        _say(
            "[submit] hint: the cluster has no tensormask_ray installed: start it from the image "
            "built with cluster/Dockerfile, or (same Python/torch as here) pass --ship-code"
        )
    return 0 if status == "SUCCEEDED" else 1


def _dry_run(spec, address: str, token) -> int:
    files = shipped_files(spec.working_dir, spec.runtime_env["excludes"])
    view = {
        "address": address,
        "token": f"from {token.source}" if token else None,
        "entrypoint": spec.entrypoint,
        "runtime_env": spec.runtime_env,
        "metadata": spec.metadata,
        "ship_code": spec.ship_code,
        "shipped_files": [str(f) for f in files],
    }
    print(json.dumps(view, indent=2))
    return 0


__all__ = ["add_arguments", "add_common", "run", "split_args"]

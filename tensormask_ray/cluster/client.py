"""A thin layer over Ray's Jobs SDK (`ray.job_submission.JobSubmissionClient`) for `submit` and
`jobs`: one address, one token, bounded timeouts, and errors a user can act on.

- The address is the head's job server (the dashboard port, 8265 by default) as `http(s)://...`:
  `--address`, else `RAY_API_SERVER_ADDRESS`, else `RAY_ADDRESS` when it is an http(s) URL. The
  SDK itself lets those variables override an explicit address; we resolve it once and build the
  client with them hidden, so a token is only ever sent to the server the user named.
- Before anything else the server is probed with a bounded timeout, so an address where nothing
  listens fails within seconds with a `UserError` naming it, instead of hanging in the SDK.
- Every request carries a timeout; authentication failures (HTTP 401/403) become `UserError`s
  that say where the token was looked for, never what it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from ..errors import UserError
from .auth import Token, redactor

DEFAULT_PORT = 8265
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0  # uploads of a working dir can take a while
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def resolve_address(address: str | None, environ=None) -> str:
    """The job server's base URL, e.g. http://127.0.0.1:8265 (no trailing slash)."""
    env = os.environ if environ is None else environ
    source = "--address"
    if not address:
        for var in _ADDRESS_VARS:
            value = env.get(var, "")
            if value.startswith(("http://", "https://")) or (
                var == "RAY_API_SERVER_ADDRESS" and value
            ):
                address, source = value, var
                break
    if not address:
        raise UserError(
            "no Ray job server given: pass --address http://HEAD:8265 (the head's dashboard port, "
            "e.g. forwarded to this machine with `ray dashboard` or `kubectl port-forward`), or set "
            "RAY_API_SERVER_ADDRESS"
        )
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise UserError(
            f"{source} {address}: that is a Ray Client address; give the job server's HTTP address "
            f"instead, e.g. http://HEAD:{DEFAULT_PORT}"
        )
    if "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{source} {address}: expected http(s)://HOST[:PORT]")
    if parts.username or parts.password:
        raise UserError(
            f"{source}: do not put credentials in the address; use --token-file or RAY_AUTH_TOKEN"
        )
    if parts.port is None:
        address = f"{parts.scheme}://{parts.netloc}:{DEFAULT_PORT}{parts.path}"
    return address


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    saved = {var: os.environ.pop(var) for var in _ADDRESS_VARS if var in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def probe(address: str, token: Token | None = None, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """GET /api/version within `timeout` seconds; returns the cluster's Ray version."""
    import requests

    url = f"{address}/api/version"
    try:
        r = requests.get(
            url, headers=token.headers() if token else None, timeout=(timeout, timeout)
        )
    except requests.exceptions.ConnectTimeout as e:
        raise UserError(
            f"cannot reach the Ray job server at {address}: no answer within {timeout:g} s "
            "(a firewall, a wrong host, or a tunnel that is not up?)"
        ) from e
    except requests.exceptions.ConnectionError as e:
        reason = (
            "connection refused: nothing listens there"
            if "refused" in str(e).lower()
            else "connection failed"
        )
        raise UserError(
            f"cannot reach the Ray job server at {address}: {reason}. Is the head running, and is "
            "its dashboard port forwarded to this machine (see docs/cluster.md)?"
        ) from e
    except requests.exceptions.RequestException as e:
        raise UserError(f"cannot reach the Ray job server at {address}: {type(e).__name__}") from e
    if r.status_code in (401, 403):
        raise _auth_error(address, token, r.status_code)
    if r.status_code != 200:
        raise UserError(
            f"{address} is not a Ray job server: GET /api/version answered HTTP {r.status_code}"
        )
    try:
        return str(r.json().get("ray_version", "?"))
    except ValueError as e:
        raise UserError(
            f"{address} is not a Ray job server: /api/version did not return JSON"
        ) from e


def _auth_error(address: str, token: Token | None, status: int | None) -> UserError:
    if token is None:
        return UserError(
            f"the Ray job server at {address} requires its authentication token (HTTP "
            f"{status or 401}): set RAY_AUTH_TOKEN, or pass --token-file PATH (on a cluster "
            "started with `ray up`, `ray get-auth-token` on the head prints it; on KubeRay it is "
            "in the cluster's Secret)"
        )
    return UserError(
        f"the Ray job server at {address} rejected the authentication token from {token.source} "
        f"(HTTP {status or 403}): it is not this cluster's token"
    )


class JobClient:
    """The Jobs SDK client for one job server, with timeouts, token and friendly errors."""

    def __init__(
        self, address: str, token: Token | None, connect_timeout: float = CONNECT_TIMEOUT_S
    ):
        self.address = address
        self.token = token
        self.redact: Callable[[str], str] = redactor(token)
        self.ray_version = probe(address, token, connect_timeout)
        self._sdk = self._call(lambda: _make_sdk_client(address, token, connect_timeout))

    # -- errors
    def _call(self, fn):
        import requests
        from ray.exceptions import AuthenticationError

        try:
            return fn()
        except AuthenticationError as e:
            status = 401 if "required" in str(e).lower() else 403
            raise _auth_error(self.address, self.token, status) from None
        except (requests.exceptions.ConnectionError, ConnectionError) as e:
            raise UserError(
                f"lost the connection to the Ray job server at {self.address}: {type(e).__name__}"
            ) from None
        except requests.exceptions.Timeout:
            raise UserError(
                f"the Ray job server at {self.address} did not answer in time"
            ) from None
        except RuntimeError as e:
            text = self.redact(str(e))
            if "404" in text or "does not exist" in text:
                raise UserError(f"no such job on {self.address} ({text.strip()[:300]})") from None
            raise UserError(
                f"the Ray job server at {self.address} refused the request: {text[:1000]}"
            ) from None

    # -- jobs
    def submit(self, **kwargs) -> str:
        return self._call(lambda: self._sdk.submit_job(**kwargs))

    def upload_package_file(self, path: str) -> str:
        """Uploads a zip file to the cluster's package store; returns its gcs:// URI."""
        from .. import ray_compat

        return self._call(lambda: ray_compat.upload_package_file(self._sdk, path))

    def info(self, job_id: str):
        return self._call(lambda: self._sdk.get_job_info(job_id))

    def status(self, job_id: str) -> str:
        return str(self._call(lambda: self._sdk.get_job_status(job_id)).value)

    def list(self) -> list:
        return self._call(self._sdk.list_jobs)

    def logs(self, job_id: str) -> str:
        return self.redact(self._call(lambda: self._sdk.get_job_logs(job_id)))

    def stop(self, job_id: str) -> bool:
        return bool(self._call(lambda: self._sdk.stop_job(job_id)))

    def wait(self, job_id: str, timeout: float, poll: float = 0.5) -> str:
        """Polls until the job is terminal or `timeout` passes; returns the last status."""
        deadline = time.monotonic() + timeout
        status = self.status(job_id)
        while status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(poll)
            status = self.status(job_id)
        return status

    def follow(self, job_id: str, out=None) -> str:
        """Streams the job's logs to `out` (stdout) until it ends; returns its final status.

        Output is redacted a whole line at a time, so a token split across two chunks of the
        stream is still caught. If the stream breaks, falls back to polling the status."""
        if out is None:  # the job's log, whole: not routed like this process's own libraries
            from ..console import unrouted_stdout

            out = unrouted_stdout()
        self.info(job_id)  # a clear error for an unknown id before opening the stream

        async def _tail() -> None:
            pending = ""
            async for chunk in self._sdk.tail_job_logs(job_id):
                pending += chunk
                cut = max(pending.rfind("\n"), pending.rfind("\r")) + 1  # whole lines only
                if cut:
                    out.write(self.redact(pending[:cut]))
                    out.flush()
                    pending = pending[cut:]
            if pending:
                out.write(self.redact(pending) + "\n")
                out.flush()

        try:
            asyncio.run(_tail())
        except Exception as e:  # noqa: BLE001 - the stream is best effort; the status is not
            print(
                f"[jobs] log stream of {job_id} broke ({type(e).__name__}); waiting for the job to end",
                file=sys.stderr,
            )
        return self.wait(job_id, timeout=float("inf"), poll=2.0)


def _quiet_sdk_logs() -> None:
    """The SDK logs each upload and websocket close at INFO, and warns that `.git` is excluded
    (which we want): we print our own, shorter account instead."""
    import logging

    from ..ray_compat import RUNTIME_ENV_PACKAGING, RUNTIME_ENV_WORKING_DIR, runtime_env_loggers

    runtime_env_loggers()  # checks that these loggers' modules still exist
    for name in (
        "ray.dashboard.modules.dashboard_sdk",
        "ray.dashboard.modules.job.sdk",
        RUNTIME_ENV_PACKAGING,
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger(RUNTIME_ENV_WORKING_DIR).setLevel(logging.ERROR)


def _make_sdk_client(address: str, token: Token | None, connect_timeout: float):
    from ray.job_submission import JobSubmissionClient

    _quiet_sdk_logs()

    class _TimeoutClient(JobSubmissionClient):
        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", (connect_timeout, READ_TIMEOUT_S))
            return super()._do_request(method, endpoint, **kwargs)

    with _without_address_env():
        return _TimeoutClient(address, headers=token.headers() if token else None)


__all__ = ["JobClient", "TERMINAL", "probe", "resolve_address"]

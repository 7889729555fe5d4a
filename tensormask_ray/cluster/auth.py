"""The Ray cluster's authentication token, held so that it cannot leak.

Ray (2.52+) protects the dashboard, the job server and every control-plane RPC with one static
bearer token when the head runs with `RAY_AUTH_MODE=token` (the default for local clusters since
Ray 2.59). `submit` and `jobs` send it as `Authorization: Bearer ...` on each request to the job
server, and nowhere else: it is never put in a job's entrypoint, runtime environment or metadata
(the job's driver authenticates with the token the cluster's own nodes hold), and every line we
print goes through `Token.redact`.

Where the token comes from, first match wins:

1. `--token-file PATH`: a file the user names (one line, the token);
2. `RAY_AUTH_TOKEN`: the token itself;
3. `RAY_AUTH_TOKEN_PATH`: a file holding it (Ray's own variable; an unreadable file is an error);
4. `~/.ray/auth_token` (Ray's default file), only for a job server on this machine (a loopback
   address, which includes a `kubectl port-forward` or `ray dashboard` tunnel), so a token made
   for local clusters is never sent to a remote host the user did not name it for.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import UserError

ENV_TOKEN = "RAY_AUTH_TOKEN"
ENV_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
REDACTED = "<redacted>"


@dataclass(frozen=True, repr=False)
class Token:
    """A bearer token and where it came from. Its repr/str never show the value."""

    _value: str
    source: str  # e.g. "RAY_AUTH_TOKEN" or "--token-file /path": safe to print

    def __repr__(self) -> str:
        return f"Token(source={self.source!r})"

    __str__ = __repr__

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._value}"}

    def redact(self, text: str) -> str:
        return text.replace(self._value, REDACTED) if self._value else text

    def matches(self, text: str) -> bool:
        """True if `text` contains the token (used to refuse it in job env vars)."""
        return bool(self._value) and self._value in text


def _read_token_file(path: str | Path, what: str) -> str:
    p = Path(path).expanduser()
    try:
        value = p.read_text().strip()
    except OSError as e:
        raise UserError(f"{what} {p}: cannot read the token file ({e.strerror or e})") from e
    if not value:
        raise UserError(f"{what} {p}: the token file is empty")
    if any(c.isspace() for c in value):
        raise UserError(f"{what} {p}: the token file must hold a single token on one line")
    return value


def is_loopback(address: str) -> bool:
    """True for http(s)://localhost..., 127.0.0.0/8 and [::1] addresses."""
    host = urlsplit(address if "://" in address else f"http://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(token_file: str | None, address: str, environ=None) -> Token | None:
    """The token to send to the job server at `address`, or None (a head without token auth)."""
    env = os.environ if environ is None else environ
    if token_file:
        return Token(_read_token_file(token_file, "--token-file"), f"--token-file {token_file}")
    if env.get(ENV_TOKEN, "").strip():
        return Token(env[ENV_TOKEN].strip(), ENV_TOKEN)
    if env.get(ENV_TOKEN_PATH):
        path = env[ENV_TOKEN_PATH]
        return Token(_read_token_file(path, ENV_TOKEN_PATH), f"{ENV_TOKEN_PATH} ({path})")
    default = DEFAULT_TOKEN_FILE.expanduser()
    if is_loopback(address) and default.is_file():
        return Token(_read_token_file(default, "Ray's default token file"), str(DEFAULT_TOKEN_FILE))
    return None


def cleartext_warning(address: str, token: Token | None) -> str | None:
    """A warning when the token would cross a network in plain HTTP (not for loopback tunnels)."""
    if token is None or address.startswith("https://") or is_loopback(address):
        return None
    host = urlsplit(address).hostname
    return (
        f"sending the cluster's token to {host} over plain HTTP: anyone on the path can read it; "
        "reach the head through `ray dashboard` or `kubectl port-forward` (then use "
        "http://127.0.0.1:8265), or an https proxy"
    )


def redactor(token: Token | None):
    """A function that blanks the token out of any text (identity without a token)."""
    if token is None:
        return lambda text: text
    return token.redact


__all__ = [
    "DEFAULT_TOKEN_FILE",
    "Token",
    "cleartext_warning",
    "is_loopback",
    "redactor",
    "resolve_token",
]

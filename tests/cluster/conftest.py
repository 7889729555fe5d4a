"""Fixtures of the cluster tests: one real local Ray head (token auth on, loopback
job server, free ports, its own temp dir), and a runner for the `tensormask-ray` CLI as a user
runs it (a subprocess, in a project folder of its own, with a HOME of its own so that no
`~/.ray/auth_token` of this machine is picked up)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ._head import REPO, LocalHead, package_importable_without_path

_SCRUB = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "MLFLOW_TRACKING_URI",
)


@dataclass
class Transcript:
    """Everything our CLI printed in this session, to check that no token ever appears in it."""

    outputs: list[str] = field(default_factory=list)


@pytest.fixture(scope="session")
def transcript() -> Transcript:
    return Transcript()


@pytest.fixture(scope="module")
def head():
    """Module-scoped (only test_jobs.py uses it), so it is gone before other packages' tests start
    their own local Ray: two Rays on one machine confuse Ray's `address="auto"` lookups."""
    h = LocalHead(num_cpus=2)
    h.start()
    try:
        yield h
    finally:
        h.stop()
        assert not h.pids(), "processes of the test head survived stop()"


@dataclass
class Cli:
    home: Path
    transcript: Transcript
    installed: bool

    def __call__(
        self,
        *args: str,
        cwd: Path,
        env: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess:
        full_env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        full_env.update(
            HOME=str(self.home), MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0"
        )
        if not self.installed:
            full_env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(REPO), full_env.get("PYTHONPATH")) if p
            )
        full_env.update(env or {})
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "tensormask_ray.cli", *args],
            cwd=cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        r.seconds = time.monotonic() - t0  # type: ignore[attr-defined]
        self.transcript.outputs += [r.stdout, r.stderr]
        return r


@pytest.fixture(scope="session")
def cli(tmp_path_factory, transcript) -> Cli:
    home = tmp_path_factory.mktemp("home")
    return Cli(home=home, transcript=transcript, installed=package_importable_without_path())


def make_project(root: Path) -> Path:
    """A user's project folder: what should be shipped (configs) and what never should."""
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "note.yaml").write_text("train: {run_name: x}\n")
    for d in (
        "data",
        "runs",
        "checkpoints",
        ".git",
        ".venv",
        "tensormask_ray",
        "mlruns",
        "nested/__pycache__",
    ):
        (root / d).mkdir(parents=True)
        (root / d / "file.txt").write_text("must not be shipped\n")
    (root / "tensormask_ray" / "__init__.py").write_text(
        "raise ImportError('the shipped copy shadowed the installed one')\n"
    )
    (root / "data" / "shard-0.parquet").write_bytes(b"PAR1")
    (root / "model.pt").write_bytes(b"\0" * 16)
    (root / "mlflow.db").write_bytes(b"sqlite")
    (root / ".env").write_text("SECRET=1\n")
    (root / "README.md").write_text("my experiments\n")
    return root


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("project"))

"""A real `mlflow server` on a free loopback port, and a small client of its REST API: what the
tests check is what MLflow's UI reads (the UI is a client of the same API).

The server runs without MLflow's GenAI job workers (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false:
they would start eight more Python processes) and with one web worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

API = "/api/2.0/mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` over a sqlite store (started by `start`, stopped by `stop`)."""

    def __init__(self, store_uri: str, workdir: Path):
        self.store_uri, self.workdir = store_uri, Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240.0) -> MlflowServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        self.log = open(self.workdir / "server.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store_uri, "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1", "--artifacts-destination", str(self.workdir / "served-artifacts")],
            cwd=self.workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self.proc.returncode}: {self.log_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"mlflow server did not answer on {self.url} within {timeout:.0f} s: {self.log_text()[-3000:]}"
        )

    def log_text(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()

    # ------------------------------------------------------------------ REST
    def get(self, endpoint: str, **params: Any) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}{API}/{endpoint}?{query}", timeout=60) as r:
            return json.loads(r.read())

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"{self.url}{API}/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            return json.loads(r.read())

    def experiment(self, name: str) -> dict:
        return self.get("experiments/get-by-name", experiment_name=name)["experiment"]

    def search_runs(
        self, experiment_id: str, filter: str = "", order_by: list[str] | None = None
    ) -> list[dict]:
        body = {
            "experiment_ids": [experiment_id],
            "filter": filter,
            "max_results": 1000,
            "order_by": order_by or [],
        }
        return self.post("runs/search", body).get("runs", [])

    def run(self, run_id: str) -> dict:
        return self.get("runs/get", run_id=run_id)["run"]

    def metric_history(self, run_id: str, key: str) -> list[dict]:
        return self.get("metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])

    def artifacts(self, run_id: str, path: str = "") -> set[str]:
        """Paths of the run's artifacts directly under `path`."""
        files = self.get("artifacts/list", run_id=run_id, path=path).get("files", [])
        return {f["path"] for f in files}

    def artifact_text(self, run_id: str, path: str) -> str:
        """An artifact's content, as the UI's artifact viewer fetches it."""
        query = urllib.parse.urlencode({"run_id": run_id, "path": path})
        with urllib.request.urlopen(f"{self.url}/get-artifact?{query}", timeout=60) as r:
            return r.read().decode()

    def logged_model(self, model_id: str) -> dict:
        return self.get(f"logged-models/{model_id}")["model"]

    def model_version(self, name: str, version: str) -> dict:
        return self.get("model-versions/get", name=name, version=version)["model_version"]


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def datasets(run: dict) -> list[tuple[dict, dict[str, str]]]:
    """(dataset, {input tag: value}) of the run's dataset inputs."""
    inputs = run.get("inputs", {}).get("dataset_inputs", [])
    return [(d["dataset"], {t["key"]: t["value"] for t in d.get("tags", [])}) for d in inputs]

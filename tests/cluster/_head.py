"""A real local Ray head for the cluster tests, isolated from any other Ray on the machine.

- Every port is a free one picked here (GCS, dashboard/job server, Ray Client, node manager,
  object manager, agents, metrics, a worker port range), so parallel runs do not collide.
- Its own short `--temp-dir` (sockets, logs, `ray_current_cluster`), so `address="auto"` elsewhere
  never finds it and it never finds theirs.
- Token authentication on, with a random token handed to it through `RAY_AUTH_TOKEN`: nothing is
  written to `~/.ray/auth_token`. The dashboard and job server bind to 127.0.0.1.
- `ray start` runs in a new session; `stop()` terminates exactly the processes of that session
  and their descendants (job drivers start their own sessions, but are children of this head's
  workers), never a global `ray stop`.
- `LocalNode`: a second node joining the head the same way; `kill()` takes its processes down at
  once by their pids (a lost machine), `start()` brings it back as a new node.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def free_port_range(width: int, lo: int = 20000, hi: int = 32000) -> tuple[int, int]:
    """A run of `width` ports that are all free now (worker ports)."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        start = rng.randrange(lo, hi - width)
        ok = True
        for port in range(start, start + width):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return start, start + width - 1
    raise RuntimeError("no free range of worker ports")


def package_importable_without_path() -> bool:
    """True if tensormask_ray is installed in this interpreter (not just importable from the repo)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", "import tensormask_ray"],
        cwd=tempfile.gettempdir(),
        env=env,
        capture_output=True,
    )
    return r.returncode == 0


def _procs() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, session id), from /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(d)] = (int(fields[1]), int(fields[3]))
    return out


class LocalHead:
    def __init__(self, num_cpus: int = 2, token: str | None = None):
        self.num_cpus = num_cpus
        self.token = token or secrets.token_hex(32)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="tmr-ray-", dir="/tmp"))  # short: socket paths
        (
            self.gcs,
            self.dashboard,
            self.client,
            self.node_manager,
            self.object_manager,
            self.agent_listen,
            self.agent_grpc,
            self.metrics,
            self.runtime_env_agent,
        ) = free_ports(9)
        self.worker_ports = free_port_range(64)
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.session: int | None = None
        self.env = self._env()

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
        }
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            MLFLOW_DISABLE_TELEMETRY="true",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        )
        if not package_importable_without_path():  # not pip-installed yet: the repo stands in
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        return env

    def start(self, timeout: float = 120.0) -> LocalHead:
        cmd = [
            str(Path(sys.executable).parent / "ray"), "start", "--head",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--num-cpus={self.num_cpus}", "--num-gpus=0",
            f"--port={self.gcs}", f"--dashboard-port={self.dashboard}",
            f"--ray-client-server-port={self.client}",
            f"--node-manager-port={self.node_manager}", f"--object-manager-port={self.object_manager}",
            f"--dashboard-agent-listen-port={self.agent_listen}",
            f"--dashboard-agent-grpc-port={self.agent_grpc}",
            f"--metrics-export-port={self.metrics}", f"--runtime-env-agent-port={self.runtime_env_agent}",
            f"--min-worker-port={self.worker_ports[0]}", f"--max-worker-port={self.worker_ports[1]}",
            f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
        ]  # fmt: skip
        log = self.temp_dir / "ray-start.log"  # a file, not a pipe: the daemons inherit it
        with open(log, "w") as f:
            proc = subprocess.Popen(
                cmd,
                env=self.env,
                cwd=self.temp_dir,
                start_new_session=True,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        self.session = proc.pid
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"`ray start --head` did not return within {timeout:g} s") from None
        if proc.returncode != 0:
            out = log.read_text()[-4000:]
            self.stop()
            raise RuntimeError(f"`ray start --head` failed ({proc.returncode}):\n{out}")
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import requests

        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self.token}"}
        while time.monotonic() < deadline:
            try:
                r = requests.get(f"{self.address}/api/jobs/", headers=headers, timeout=5)
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the job server at {self.address} did not come up within {timeout:g} s")

    def pids(self) -> set[int]:
        """This head's processes: its session, and every descendant of them."""
        return _session_pids(self.session)

    def alive_nodes(self) -> list[dict]:
        """The nodes the cluster holds alive (Ray's state API, through the dashboard)."""
        import requests

        r = requests.get(
            f"{self.address}/api/v0/nodes", params={"limit": 100, "detail": "false"},
            headers={"Authorization": f"Bearer {self.token}"}, timeout=10,
        )  # fmt: skip
        r.raise_for_status()
        nodes = r.json()["data"]["result"]["result"]
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def stop(self, grace: float = 5.0) -> None:
        pids = self.pids()
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                pids = {p for p in pids if _alive(p)}
                if not pids:
                    break
                time.sleep(0.2)
            if not pids:
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.session = None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie is gone, only not reaped
    except (OSError, IndexError):
        return False


class LocalNode:
    """A second Ray node on this machine joining `head` (`ray start --address`): its own resources,
    free ports and `--temp-dir`, in a session of its own, so that `kill()` can take exactly its
    processes (raylet, agents, workers) down, as a machine that is lost takes them, and `start()`
    can bring it back as a new node."""

    def __init__(
        self, head: LocalHead, num_cpus: int = 2, resources: dict[str, float] | None = None
    ):
        self.head, self.num_cpus, self.resources = head, num_cpus, dict(resources or {})
        self.session: int | None = None
        self.temp_dir: Path | None = None

    def start(self, timeout: float = 120.0) -> LocalNode:
        import json

        self.temp_dir = Path(tempfile.mkdtemp(prefix="tmr-node-", dir="/tmp"))
        node_manager, object_manager, agent_listen, agent_grpc, metrics, runtime_env_agent = (
            free_ports(6)
        )
        lo, hi = free_port_range(32)
        cmd = [
            str(Path(sys.executable).parent / "ray"), "start", f"--address=127.0.0.1:{self.head.gcs}",
            "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
            f"--resources={json.dumps(self.resources)}",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent_listen}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env_agent}",
            f"--min-worker-port={lo}", f"--max-worker-port={hi}", f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]  # fmt: skip
        known = {
            n["node_id"] for n in self.head.alive_nodes()
        }  # a killed node may still count as alive
        log = self.temp_dir / "ray-start.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(
                cmd,
                env=self.head.env,
                cwd=self.temp_dir,
                start_new_session=True,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        self.session = proc.pid
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(
                f"`ray start --address` did not return within {timeout:g} s"
            ) from None
        if proc.returncode != 0:
            out = log.read_text()[-4000:]
            self.kill()
            raise RuntimeError(f"`ray start --address` failed ({proc.returncode}):\n{out}")
        deadline = time.monotonic() + timeout
        while not {n["node_id"] for n in self.head.alive_nodes()} - known:
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the node did not join the head within {timeout:g} s")
            time.sleep(0.5)
        return self

    def pids(self) -> set[int]:
        return _session_pids(self.session)

    def kill(self) -> set[int]:
        """SIGKILL to every process of this node at once (no shutdown of any kind); returns their
        pids once they are all gone."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.session = None
        return pids


def _session_pids(session: int | None) -> set[int]:
    """The processes of a session and every descendant of them (this process excepted)."""
    if session is None:
        return set()
    procs = _procs()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo = [pid for pid, (_, sid) in procs.items() if sid == session]
    found: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    found.discard(os.getpid())
    return found

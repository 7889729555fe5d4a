"""The terminal shows our lines; Ray's and other libraries' logs go to the log file unless
verbose (tensormask_ray/console.py)."""

from __future__ import annotations

import io
import logging
import sys
import warnings

import pytest

from tensormask_ray import console
from tensormask_ray.console import LineRouter, LogFile

# What Ray 2.60 printed on the driver during `make demo` (issue 17), one write each.
RAY_LINES = [
    "\x1b[36m(TrainController pid=6364)\x1b[0m Requesting resources: {'CPU': 1.0} * 2\n",
    "\x1b[36m(RayTrainWorker pid=6494)\x1b[0m Reporting training result 1: TrainingReport(checkpoint=None, metrics={'iteration': 110})\n",
    "\x1b[36m(SplitCoordinator pid=6905)\x1b[0m Execution plan of Dataset train_0: InputDataBuffer[Input] -> TaskPoolMapOperator[ReadParquet]\n",
    "\x1b[36m(SplitCoordinator pid=6905)\x1b[0m Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.\n",
    "\x1b[36m(TrainController pid=6364)\x1b[0m [2026-12-02 17:17:43,553 E 6364 6392] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' has constructor arguments in the object store and max_restarts > 0.\n",
    "\x1b[33m(raylet)\x1b[0m WARNING: 4 PYTHON worker processes have been started on node: abc with address: 10.0.0.1.\n",
    "2026-12-02 17:16:57,942\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this Ray cluster.\n",
    "2026-12-02 17:17:05,870\tINFO worker.py:2029 -- Started a local Ray instance.\nwith a second line\n",
    "[2026-12-02 17:32:20,732 E 5432 5432] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(Predictor))'\n",
    "2026/12/02 17:17:15 INFO mlflow.store.db.utils: Creating initial MLflow database tables...\n",
    "/x/ray/data/execution_options.py:436: RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated\n  self.exclude_resources = exclude_resources\n",
]


@pytest.fixture
def router(tmp_path):
    terminal = io.StringIO()
    log = LogFile(tmp_path / "logs" / "run.log")
    return LineRouter(terminal, log, verbose=False), terminal, log


def test_ray_lines_go_to_the_log_and_ours_to_the_terminal(router):
    r, terminal, log = router
    for chunk in RAY_LINES:
        r.write(chunk)
    r.write(
        "\x1b[36m(RayTrainWorker pid=6470)\x1b[0m [train] iter 10/220  eta 2m10s  loss 3.834 [repeated 2x across cluster]\n"
    )
    print("==> [ 13 s] 2/6 train", file=r)
    print("segm    15.1   28.9", file=r)
    r.flush()
    assert terminal.getvalue().splitlines() == [
        "[train] iter 10/220  eta 2m10s  loss 3.834",
        "==> [ 13 s] 2/6 train",
        "segm    15.1   28.9",
    ]
    logged = log.path.read_text()
    for chunk in RAY_LINES:
        assert chunk.splitlines()[-1] in logged
    assert "[train] iter 10/220" in logged and "==> [ 13 s]" in logged


def test_verbose_shows_everything(tmp_path):
    terminal = io.StringIO()
    r = LineRouter(terminal, LogFile(tmp_path / "v.log"), verbose=True)
    for chunk in RAY_LINES:
        r.write(chunk)
    assert terminal.getvalue() == "".join(RAY_LINES)


def test_messages_that_matter_are_said_in_our_words_once(router):
    r, terminal, log = router
    died = "\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task by an unexpected system error.\n"
    r.write(died)
    r.write(died)
    shown = terminal.getvalue().splitlines()
    assert len(shown) == 1 and shown[0].startswith("[ray] warning: a Ray worker process died")
    assert str(log.path) in shown[0]


def test_hidden_worker_tags_go_to_the_log_only(router):
    r, terminal, _ = router
    r.hidden.add("[train]")
    r.write(
        "(RayTrainWorker pid=1) [train] iter 6/12\n(TrainController pid=2) [warning] training worker rank 0 failed\n"
    )
    print("[train] printed by the driver itself", file=r)
    assert terminal.getvalue().splitlines() == [
        "[warning] training worker rank 0 failed",
        "[train] printed by the driver itself",
    ]


def test_routed_redirects_streams_and_logging_handlers_and_restores_them(tmp_path, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    handler = logging.StreamHandler(err)  # made before, as Ray's are at import
    handler.setFormatter(
        logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s")
    )
    logger = logging.getLogger("ray.test_console")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with console.routed("train", log_dir=tmp_path) as c:
            print("[train] ours")
            logger.warning("Ray's own")
            sys.stderr.write(
                warnings.formatwarning("a library's", DeprecationWarning, "/x/lib.py", 3)
            )
        assert sys.stdout is out and sys.stderr is err and handler.stream is err
    finally:
        logger.removeHandler(handler)
    shown = out.getvalue() + err.getvalue()
    assert "[train] ours" in shown and f"Logs of Ray and other libraries: {c.log.path}" in shown
    assert "Ray's own\n" not in shown and "a library's" not in shown
    logged = c.log.path.read_text()
    assert "Ray's own" in logged and "a library's" in logged and c.log.path.parent == tmp_path


def test_verbose_from_the_environment(monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.is_verbose()
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert not console.is_verbose() and console.is_verbose(True)


def test_a_local_ray_gets_room_for_ray_data_and_a_cluster_its_own_count(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(console.os, "cpu_count", lambda: 2)
    assert console.local_ray_cpus(None) == console.MIN_LOCAL_CPUS == 4
    assert console.local_ray_cpus("local", needed=6.5) == 7  # e.g. inference actors + 1
    monkeypatch.setattr(console.os, "cpu_count", lambda: 16)
    assert console.local_ray_cpus(None, needed=3) == 16
    # Joining a running cluster: ray.init must not be given num_cpus.
    assert console.local_ray_cpus("ray://head:10001") is None
    assert console.local_ray_cpus("auto") is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert console.local_ray_cpus(None) is None
    assert console.local_ray_cpus("local") == 16  # "local" starts one even where RAY_ADDRESS is set


_NATIVE_SCRIPT = r"""
import os, sys
from tensormask_ray import console
with console.routed("evaluate", log_dir=sys.argv[1]) as c:
    c.capture_native_stderr()  # what ensure_ray does before Ray starts
    os.write(2, b"[2026-12-02 17:32:20,732 E 5432 5432] core_worker.cc:2465: Actor native\n")
    print("[evaluate] ours on stderr", file=sys.stderr, flush=True)
    print("[evaluate] ours on stdout", flush=True)
os.write(2, b"after the command\n")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_native_writes_to_fd_2_go_to_the_log_unless_verbose(tmp_path, verbose):
    """Ray's C++ core worker writes its warnings straight to file descriptor 2, past sys.stderr:
    while a command runs they land in the log file, and fd 2 is the terminal again after it."""
    import os
    import subprocess

    env = {**os.environ, console.VERBOSE_ENV: "1" if verbose else "0"}
    r = subprocess.run([sys.executable, "-c", _NATIVE_SCRIPT, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (log,) = tmp_path.glob("*.log")
    assert "[evaluate] ours on stderr" in r.stderr and "[evaluate] ours on stdout" in r.stdout
    assert "after the command" in r.stderr and "after the command" not in log.read_text()
    assert (
        f"Logs of Ray and other libraries{' are shown (verbose) and kept in' if verbose else ':'} {log}"
        in r.stderr
    )
    if verbose:
        assert "core_worker.cc:2465: Actor native" in r.stderr
    else:
        assert "core_worker.cc:2465: Actor native" not in r.stderr
        assert "core_worker.cc:2465: Actor native" in log.read_text()

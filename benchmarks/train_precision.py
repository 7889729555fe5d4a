"""A training step (forward, backward, optimiser step) on the CPU in the modes a user can pick:
float32 with torch's per-parameter AdamW (the step before bf16 and the fused optimiser), the step
the trainer runs now (torch's fused AdamW, `build_optimizer`), that step in bf16 autocast
(`solver.amp=bf16`), and each of those in channels_last memory format.

    python benchmarks/train_precision.py [--models cpu-small demo] [--repeats 7] [--threads 1] [--write]

Models as in benchmarks/train_step.py (random weights, synthetic images with six rectangles):
  cpu-small  the cpu-small preset, 288x384, batch 2
  demo       the demo's model (tensormask_ray.demo.DEMO_MODEL), 256x320, batch 1
One thread by default: a Ray Train worker of the demo and of the cpu-small runs has one CPU. The
modes take turns within every repeat (medians); each mode steps its own copy of the same weights,
so their losses at the first step are compared too (bf16 vs float32). `--compile` adds a mode with
`torch.compile` (inductor, default mode) of the backbone, the FPN and the head, in float32 and in
bf16; its first step, which compiles, is timed apart (it takes minutes on 2 cores, about as long
as the demo's whole training).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_md import BenchmarkRun, add_write_args, time_interleaved  # noqa: E402
from train_step import MODELS, setup  # noqa: E402

from tensormask_ray.config import SolverConfig  # noqa: E402
from tensormask_ray.train.loop import cpu_has_bf16  # noqa: E402
from tensormask_ray.train.schedule import build_optimizer  # noqa: E402

# name -> (fused optimiser, bf16 autocast, channels_last, torch.compile)
MODES = {
    "fp32, per-parameter AdamW (before)": (False, False, False, False),
    "fp32, fused AdamW": (True, False, False, False),
    "bf16, fused AdamW (demo default)": (True, True, False, False),
    "fp32 channels_last, fused AdamW": (True, False, True, False),
    "bf16 channels_last, fused AdamW": (True, True, True, False),
}
COMPILE_MODES = {
    "fp32 torch.compile, fused AdamW": (True, False, False, True),
    "bf16 torch.compile, fused AdamW": (True, True, False, True),
}
BEFORE, NOW = "fp32, per-parameter AdamW (before)", "bf16, fused AdamW (demo default)"


def make_step(model, images, targets, fused: bool, bf16: bool, channels_last: bool, compiled: bool):
    """-> (step function, loss of the first step, seconds of the first step) for one mode on its
    own copy of `model`."""
    model = copy.deepcopy(model)
    if compiled:  # the dense parts; the losses and target assignment have data-dependent shapes
        model.backbone = torch.compile(model.backbone)
        model.fpn = torch.compile(model.fpn)
        model.head = torch.compile(model.head)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if fused:
        optimizer = build_optimizer(model, SolverConfig(optimizer="adamw"), lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False
        )

    def step() -> float:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            losses = model(images, targets)
        loss = sum(losses.values())
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    first = step()
    return step, first, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["cpu-small", "demo"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument(
        "--compile", action="store_true", help="also torch.compile (minutes of compiling)"
    )
    add_write_args(ap, "Training step precision (CPU)")
    args = ap.parse_args()
    modes = {**MODES, **(COMPILE_MODES if args.compile else {})}
    run = BenchmarkRun.start(args)
    if not cpu_has_bf16():
        sys.exit("this CPU has no bf16 instructions: solver.amp=bf16 would train in float32")
    torch.set_num_threads(args.threads)

    table = [
        "| model | image, batch | " + " | ".join(f"{m}, s" for m in modes) + " | before / now |",
        "|---|---|" + "---:|" * (len(modes) + 1),
    ]
    first_losses = []
    for name in args.models:
        model, images, targets = setup(name)
        steps, losses, firsts = {}, {}, {}
        for mode, flags in modes.items():
            steps[mode], losses[mode], firsts[mode] = make_step(model, images, targets, *flags)
        times = time_interleaved(steps, args.repeats)
        _, _, (h, w), n = MODELS[name]
        cells = " | ".join(f"{times[m].median:.3f}" for m in modes)
        for mode in COMPILE_MODES if args.compile else ():
            first_losses.append(
                f"{name}, {mode}: first step (compiling) {firsts[mode]:.0f} s, loss "
                f"{losses[mode]:.4f}"
            )
        ratio = times[BEFORE].median / times[NOW].median
        table.append(f"| {name} | {h}x{w}, {n} | {cells} | **{ratio:.2f}x** |")
        first_losses.append(
            f"{name}: first-step loss fp32 {losses[BEFORE]:.4f}, bf16 {losses[NOW]:.4f}"
        )
        print(f"{name}: before {times[BEFORE].median:.3f} s, now {times[NOW].median:.3f} s, "
              f"{ratio:.2f}x", file=sys.stderr)  # fmt: skip

    text = "\n".join(
        [
            *run.header(threads=args.threads),
            "",
            f"Seconds per training step (forward, backward, AdamW step), median of {args.repeats}, "
            "the modes taking turns; `before / now` is the step before bf16 and the fused "
            "optimiser over the demo's default (`solver.amp=bf16`, `build_optimizer`).",
            "",
            *table,
            "",
            "Losses of the first step (same weights, same batch): " + "; ".join(first_losses) + ".",
        ]
    )
    run.publish("Training step precision (CPU)", text)


if __name__ == "__main__":
    main()

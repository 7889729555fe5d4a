"""A paper-scale TensorMask training step, stage by stage, on this CPU (issue 16's profile).

    python benchmarks/train_stages.py [--preset table2d-bipyramid-2win] [--size 800 --width 1216]
                                      [--batch 2] [--threads 2] [--write]

One forward + backward of the bipyramid R-50-FPN model (random weights; 15x15 and 11x11 windows
with the default preset) on the synthetic batch of benchmarks/model.py, run under torch.profiler
after one warm-up step. Each stage's callables are wrapped in a `record_function` range for the
profiled step only (the model's code is not changed):

  backbone          model.backbone
  FPN               model.fpn
  class / box / mask tower   the head's towers and their prediction convs (the mask tower alone)
  bipyramid fusion  upsampling + the fusion conv (per crop in the sparse training path)
  mask conv         the 1x1 convs to V'*U' channels, and their view as (N, V', U', H, W)
  window ops        decode_windows / WindowOp.dense: align2nat, up_align2nat, swap_align2nat
  targets           build_targets: window assignment, box deltas, the positives' mask targets
  losses            FL*, l1, the weighted BCE
  other             the rest of forward_training (flattening, one-hot, crop planning)

A forward stage's time is its outermost range. The backward is attributed through autograd's
sequence numbers: each `evaluate_function: XBackward` event goes to the stage whose range holds the
forward op that created node X. Shares are of the profiled step; the profiler's own overhead is
the difference to the step time measured without it (printed). Peak memory: the growth of the
peak resident set size (VmHWM, reset first) across one unprofiled step.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import normalise, synthetic_batch, tensormask  # noqa: E402
from ops import _reset_peak_rss, _status_bytes  # noqa: E402
from results_md import BenchmarkRun, add_write_args  # noqa: E402

import tensormask_ray.modeling.lazy as lazy  # noqa: E402
import tensormask_ray.modeling.tensormask as tm_module  # noqa: E402
from tensormask_ray.modeling.bipyramid import LazyBipyramidMasks  # noqa: E402
from tensormask_ray.modeling.window_op import WindowOp  # noqa: E402

SECTION = "Training step by stage (paper scale, CPU)"
STAGES = [
    "backbone",
    "FPN",
    "class tower",
    "box tower",
    "mask tower",
    "bipyramid fusion",
    "mask conv",
    "window ops",
    "targets",
    "losses",
]
PREFIX = "stage: "


def _labelled(stage: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(PREFIX + stage):
            return fn(*args, **kwargs)

    return wrapper


def instrument(model) -> None:
    """Wraps each stage's callables in a record_function range (instance and module attributes;
    undone only by dropping the model and reloading the modules, so profile last)."""
    head = model.head
    for stage, modules in (
        ("backbone", [model.backbone]),
        ("FPN", [model.fpn]),
        ("class tower", [head.cls_tower, head.cls_pred]),
        ("box tower", [head.box_tower, head.box_pred]),
        ("mask tower", [head.mask_tower]),
        ("mask conv", list(head.mask_preds)),
    ):
        for m in modules:
            m.forward = _labelled(stage, m.forward)
    if head.bipyramid is not None:
        head.bipyramid.forward = _labelled("bipyramid fusion", head.bipyramid.forward)
    for name in ("_fusion_input", "fused_crop"):
        setattr(
            LazyBipyramidMasks,
            name,
            _labelled("bipyramid fusion", getattr(LazyBipyramidMasks, name)),
        )
    lazy.decode_windows = _labelled("window ops", lazy.decode_windows)
    WindowOp.dense = _labelled("window ops", WindowOp.dense)
    tm_module.build_targets = _labelled("targets", tm_module.build_targets)
    for name in ("focal_loss_star", "box_l1_loss", "mask_bce_loss"):
        setattr(tm_module, name, _labelled("losses", getattr(tm_module, name)))


def _stage_of(event) -> str | None:
    """The outermost stage range holding a profiler event (None: none does)."""
    stage, e = None, event
    while e is not None:
        if e.name.startswith(PREFIX):
            stage = e.name[len(PREFIX) :]
        e = e.cpu_parent
    return stage


def _has_ancestor(event, prefix: str) -> bool:
    e = event.cpu_parent
    while e is not None:
        if e.name.startswith(prefix):
            return True
        e = e.cpu_parent
    return False


BACKWARD = "autograd::engine::evaluate_function"


def attribute(events) -> dict:
    """Seconds per stage, forward and backward, from the profiled step's events."""
    fwd, bwd = defaultdict(float), defaultdict(float)
    seq_stage: dict[int, str] = {}
    for e in events:
        if e.name.startswith(PREFIX) and not _has_ancestor(e, PREFIX):
            fwd[e.name[len(PREFIX) :]] += e.cpu_time_total / 1e6
        if e.sequence_nr >= 0 and not e.name.startswith(BACKWARD):
            stage = _stage_of(e)
            if stage is not None:
                seq_stage.setdefault(e.sequence_nr, stage)
    backward_total = 0.0
    for e in events:
        if e.name.startswith(BACKWARD) and not _has_ancestor(e, BACKWARD):
            s = e.cpu_time_total / 1e6
            backward_total += s
            bwd[seq_stage.get(e.sequence_nr, "other")] += s
    return {"fwd": dict(fwd), "bwd": dict(bwd), "backward_total": backward_total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="table2d-bipyramid-2win")
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--width", type=int, default=1216)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    add_write_args(ap, SECTION)
    args = ap.parse_args()
    run = BenchmarkRun.start(args)
    torch.set_num_threads(args.threads)
    h, w = args.size, args.width
    images, targets = synthetic_batch(args.batch, h, w)
    model, cfg = tensormask(h, args.preset)
    norm = normalise(images, cfg)
    model.train()

    def step() -> float:
        t0 = time.perf_counter()
        losses = model(norm, targets)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    print("warm-up step ...", file=sys.stderr, flush=True)
    step()
    base = _reset_peak_rss()
    plain_s = step()
    peak = _status_bytes("VmHWM") - base
    print(f"step without the profiler: {plain_s:.1f} s; peak RSS growth {peak / 2**30:.2f} GiB",
          file=sys.stderr, flush=True)  # fmt: skip

    instrument(model)
    print("profiled step ...", file=sys.stderr, flush=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        with record_function("step"):
            losses = model(norm, targets)
            forward_s = time.perf_counter() - t0
            sum(losses.values()).backward()
        profiled_s = time.perf_counter() - t0
    shares = attribute(prof.events())
    fwd, bwd = shares["fwd"], shares["bwd"]
    fwd["other"] = max(forward_s - sum(fwd.values()), 0.0)
    bwd["other"] = bwd.get("other", 0.0) + max(
        profiled_s - forward_s - shares["backward_total"], 0.0
    )

    rows = [
        "| stage | forward, s | backward, s | total, s | share of the step |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage in [*STAGES, "other"]:
        f, b = fwd.get(stage, 0.0), bwd.get(stage, 0.0)
        rows.append(f"| {stage} | {f:.2f} | {b:.2f} | {f + b:.2f} | {(f + b) / profiled_s:.0%} |")
    rows.append(
        f"| **step** | {forward_s:.2f} | {profiled_s - forward_s:.2f} | {profiled_s:.2f} | 100% |"
    )
    text = "\n".join(
        [
            *run.header(threads=args.threads),
            "",
            f"Preset `{args.preset}` (random weights, `model.mask_training={cfg.model.mask_training}`"
            f"), batch {args.batch} of {h}x{w} synthetic images with six boxes each; forward and "
            "backward, no optimiser step. One warm-up step, then one step without the profiler "
            f"(**{plain_s:.1f} s**; peak RSS growth **{peak / 2**30:.2f} GiB**) and one under "
            f"torch.profiler ({profiled_s:.1f} s): the table. Stages and attribution: the "
            "docstring of benchmarks/train_stages.py.",
            "",
            *rows,
        ]
    )
    run.publish(SECTION, text)


if __name__ == "__main__":
    main()

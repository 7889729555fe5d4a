"""The Table 2 ablations' figures, from finished sweeps (docs/ablations.md has the whole recipe).

    python benchmarks/ablations.py --storage-path abl/sweeps --sweeps heads-l5 bipyramid \
        --fit-shards abl/shards-fit-eval --heldout-shards abl/shards-heldout [--write]

For every trial of each sweep (in the spec's grid order) it evaluates the checkpoint the sweep kept
with `tensormask-ray evaluate --window-masks` (the CLI's code, in this process): on the training
images (COCO mask/box AP, and the mask IoU at the ground-truth windows) and, when given, on a
held-out set (the same, where detection AP is near zero at this scale and the window IoU says
whether the masks generalise). Prints one Markdown table; --write replaces the
"## Table 2 at small scale" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from results_md import BenchmarkRun  # noqa: E402

from tensormask_ray import cli  # noqa: E402
from tensormask_ray.modeling.checkpoint_file import read_state  # noqa: E402
from tensormask_ray.tune.results import trial_rows  # noqa: E402


def _head(cfg: dict) -> str:
    m = cfg["model"]
    windows = "x".join(str(v) for v in m["window_sizes"])
    if m["mask_head"] == "bipyramid":
        return f"tensor bipyramid, windows {windows}"
    kind = m["mask_head"].removeprefix("upscale_")
    return f"{kind}, {m['upscale_mode']}, lambda {m['upscale_factor']:g}, windows {windows}"


def _evaluate(checkpoint: str, shards: str, out: Path) -> dict:
    """`evaluate --window-masks` on one checkpoint -> {"segm/AP": %, ..., "bbox/AP": %, "IoU": %, ...}."""
    rc = cli.main(["evaluate", "--checkpoint", checkpoint, "--shards", shards, "--out", str(out),
                   "--num-actors", "0", "--no-mlflow", "--window-masks", "--overwrite"])  # fmt: skip
    if rc != 0:
        raise SystemExit(f"evaluate {checkpoint} on {shards} failed (exit {rc})")
    summary = json.loads((out / "metrics.json").read_text())
    return {**{k: 100 * v for k, v in summary["metrics"].items()}, **summary["window_masks"]}


def _fmt(v: float) -> str:
    return "-" if v is None or v < 0 else f"{v:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--storage-path", required=True, help="where the sweeps are (their --storage-path)"
    )
    p.add_argument("--sweeps", nargs="+", required=True)
    p.add_argument("--fit-shards", required=True, help="the training images, as shards")
    p.add_argument("--heldout-shards", help="a held-out set with the same categories")
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    # The figures are trained weights evaluated, which the load cannot change (the CPU can: its
    # kernels round differently, so the header names it).
    run = BenchmarkRun.start(args, timed=False)

    cols = ["mask AP", "AP50", "AP75", "AP_L", "box AP", "window IoU", "IoU>=0.75", "IoU_L"]
    header = ["sweep", "head", *[f"train: {c}" for c in cols]]
    if args.heldout_shards:
        header += ["held-out: window IoU", "held-out: IoU_L", "held-out: mask AP"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with tempfile.TemporaryDirectory() as tmp:
        for sweep in args.sweeps:
            rows = sorted(
                trial_rows(sweep, args.storage_path), key=lambda r: r["trial_id"]
            )  # grid order
            for r in rows:
                if not r["checkpoint"]:
                    lines.append(
                        f"| {sweep} | trial {r['trial_id']}: no checkpoint ({r['status'].lower()}) |"
                    )
                    continue
                fit = _evaluate(
                    r["checkpoint"], args.fit_shards, Path(tmp) / f"{r['trial_id']}-fit"
                )
                cfg = read_state(r["checkpoint"])["config"]
                cells = [
                    sweep,
                    _head(cfg),
                    *(
                        _fmt(fit[k])
                        for k in (
                            "segm/AP",
                            "segm/AP50",
                            "segm/AP75",
                            "segm/AP_L",
                            "bbox/AP",
                            "IoU",
                            "IoU>=0.75",
                            "IoU_L",
                        )
                    ),
                ]
                if args.heldout_shards:
                    held = _evaluate(
                        r["checkpoint"], args.heldout_shards, Path(tmp) / f"{r['trial_id']}-heldout"
                    )
                    cells += [_fmt(held["IoU"]), _fmt(held["IoU_L"]), _fmt(held["segm/AP"])]
                lines.append("| " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    body = (
        "Written by `benchmarks/ablations.py` from the sweeps "
        + ", ".join(f"`{s}`" for s in args.sweeps)
        + " (docs/ablations.md: the data, the commands, and what the figures say). All in %; "
        '"window IoU": the mask IoU at each instance\'s positive windows (the mask head alone, '
        "evaluation/window_masks.py). The machine is the one that evaluated; the sweeps trained "
        "on the same one.\n\n" + "\n".join(run.header()) + "\n\n" + "\n".join(lines)
    )
    run.publish("Table 2 at small scale", body)


if __name__ == "__main__":
    main()

"""`tensormask-ray runs compare SWEEP` (table + PNG) and `tensormask-ray runs best SWEEP`."""

from __future__ import annotations

import argparse

from ..errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="runs_command", metavar="SUBCOMMAND", required=True)
    c = sub.add_parser("compare", help="the sweep's trials as a table (best first) and a PNG of the metric per parameter")
    c.add_argument("sweep", metavar="SWEEP")
    c.add_argument("--storage-path", default="runs", metavar="URI", help="where the sweep lives (default ./runs)")
    c.add_argument("--out", metavar="PNG", help="the plot (default: <sweep dir>/compare.png)")
    b = sub.add_parser("best", help="the best trial's checkpoint path and config")
    b.add_argument("sweep", metavar="SWEEP")
    b.add_argument("--storage-path", default="runs", metavar="URI", help="where the sweep lives (default ./runs)")


def run(args: argparse.Namespace) -> int:
    from .results import format_table, load_sweep, plot_metric, trial_rows

    sweep_dir, _, spec = load_sweep(args.sweep, args.storage_path)
    rows = trial_rows(args.sweep, args.storage_path)
    if args.runs_command == "compare":
        print(format_table(rows, spec))
        out = plot_metric(rows, spec, args.out or f"{sweep_dir}/compare.png")
        print(f"wrote {out}")
        return 0
    if not rows or rows[0]["metric"] is None or not rows[0]["checkpoint"]:
        raise UserError(f"sweep '{args.sweep}' has no trial with a checkpoint scored on {spec.metric}")
    best = rows[0]
    from ..train.checkpoint import read_state

    state = read_state(best["checkpoint"])
    print(f"best trial {best['trial_id']}: {spec.metric} {best['metric']:.6g} at iteration {state.get('iteration')}")
    print(f"checkpoint: {best['checkpoint']}")
    print(f"mlflow run: {best['mlflow_run_id']}")
    print("swept values: " + ", ".join(f"{k}={v}" for k, v in best["params"].items()))
    print("config:")
    from ..config import from_dict

    print(from_dict(state["config"]).to_yaml() if isinstance(state.get("config"), dict) else state.get("config"))
    return 0

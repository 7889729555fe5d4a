"""Reading a sweep's results from its folder (no MLflow, no running Ray needed): one row per
trial with its swept values, status, best metric and the checkpoint that scored it; the table
`runs compare` prints; the PNG of the metric against each swept parameter; the best trial
(`runs best`, `evaluate --best-of`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..finite import is_finite_number
from ..train import storage
from ..train.checkpoint import MLFLOW_RUN_FILE, TRIAL_RESULT_FILE
from .spec import SweepSpec, parse_spec
from .trainable import TRIALS_DIR, trial_display_name, trial_run_name

SWEEP_FILE = "sweep.json"


def load_sweep(name: str, storage_path: str = "runs") -> tuple[str, dict[str, Any], SweepSpec]:
    """(sweep dir, sweep.json record, spec) of a sweep; a clear error if there is none."""
    sweep_dir = storage.join(storage.absolute(storage_path), name)
    path = storage.join(sweep_dir, SWEEP_FILE)
    if not storage.exists(path):
        raise UserError(
            f"no sweep '{name}' in {storage.absolute(storage_path)} (no {SWEEP_FILE}); pass --storage-path"
        )
    record = storage.read_json(path)
    spec = parse_spec(
        {k: v for k, v in record["spec"].items() if k != "source"},
        record["spec"].get("source", path),
    )
    return sweep_dir, record, spec


def _history(trial_path: str) -> list[dict[str, Any]]:
    text = storage.read_text(storage.join(trial_path, TRIAL_RESULT_FILE)) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def trial_rows(name: str, storage_path: str = "runs") -> list[dict[str, Any]]:
    """One dict per trial, best first: trial_id, name (its MLflow run's name), params, status,
    stopped_early, iterations, metric (the trial's best), checkpoint (the one that scored it),
    mlflow_run_id, metrics (the reported metrics at that checkpoint), reported ([(iteration,
    metric)] of every report with a finite metric, in order), error (Tune's report of a failed
    trial, else None)."""
    from ray.tune import ExperimentAnalysis

    sweep_dir, record, spec = load_sweep(name, storage_path)
    max_iter = spec.scheduler.max_t or record["config"]["solver"]["max_iter"]
    try:
        analysis = ExperimentAnalysis(sweep_dir)
    except Exception as e:  # noqa: BLE001 - Tune raises several types for a missing state
        raise UserError(f"sweep '{name}' in {sweep_dir} has no Tune results yet ({e})") from e
    sign = 1.0 if spec.mode == "max" else -1.0
    rows = []
    for trial in analysis.trials:
        history = _history(trial.path)
        scored = [h for h in history if is_finite_number(h.get(spec.metric))]
        best = max(scored, key=lambda h: sign * h[spec.metric]) if scored else None
        last = history[-1] if history else {}
        iterations = int(last.get("iteration", 0) or 0)
        run_dir = storage.join(sweep_dir, TRIALS_DIR, trial_run_name(trial.trial_id))
        run_id = (storage.read_text(storage.join(run_dir, MLFLOW_RUN_FILE)) or "").strip() or None
        params = {k: trial.config.get(k) for k in spec.search}
        rows.append(
            {
                "trial_id": trial.trial_id,
                "name": trial_display_name(
                    params, trial.trial_id, spec.num_samples, list(spec.search)
                ),
                "params": params,
                "status": trial.status,
                "stopped_early": trial.status == "TERMINATED" and iterations < max_iter,
                "iterations": iterations,
                "metric": best[spec.metric] if best else None,
                "checkpoint": (best or {}).get("checkpoint_path"),
                "mlflow_run_id": run_id,
                "metrics": {
                    k: v for k, v in (best or last).items() if "/" in k and is_finite_number(v)
                },
                "run_dir": run_dir,
                "reported": [
                    (int(h.get("iteration", 0) or 0), float(h[spec.metric])) for h in scored
                ],
                "error": storage.read_text(storage.join(trial.path, "error.txt"))
                if trial.status == "ERROR"
                else None,
            }
        )
    rows.sort(key=lambda r: (r["metric"] is None, -sign * (r["metric"] or 0.0)))
    return rows


def best_trial(
    sweep: str, storage_path: str = "runs", rows: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The sweep's best trial (its `trial_rows` row): the first, best by the spec's metric, when
    it scored and has a checkpoint; else a UserError. `rows`: trial_rows already read."""
    rows = trial_rows(sweep, storage_path) if rows is None else rows
    if not rows or rows[0]["metric"] is None or not rows[0]["checkpoint"]:
        _, _, spec = load_sweep(sweep, storage_path)
        raise UserError(f"sweep '{sweep}' has no trial with a checkpoint scored on {spec.metric}")
    return rows[0]


def _fmt(v: Any) -> str:
    if isinstance(v, dict):  # a variant: its keys, without their section
        return ",".join(f"{k.rsplit('.', 1)[-1]}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


def format_table(rows: list[dict[str, Any]], spec: SweepSpec) -> str:
    """The trials as a fixed-width table, best first."""
    keys = list(spec.search)
    extra = [
        k
        for k in (
            "val/segm/AP",
            "val/segm/AP50",
            "val/segm/AP75",
            "val/segm/AP_L",
            "val/bbox/AP",
            "train/loss",
        )
        if k != spec.metric
    ]
    extra = [k for k in extra if any(k in r["metrics"] for r in rows)]
    header = ["#", "trial", *keys, spec.metric, *extra, "iters", "status"]
    table = [header]
    for i, r in enumerate(rows, 1):
        status = "stopped early (ASHA)" if r["stopped_early"] else r["status"].lower()
        metric = "-" if r["metric"] is None else _fmt(r["metric"])
        table.append([str(i), r["trial_id"], *(_fmt(r["params"].get(k)) for k in keys), metric,
                      *(_fmt(r["metrics"].get(k, "-")) for k in extra), str(r["iterations"]), status])  # fmt: skip
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return (
        f"sweep '{spec.name}': {len(rows)} trials, {spec.metric} ({spec.mode}), best first\n"
        + "\n".join(lines)
    )


def plot_metric(rows: list[dict[str, Any]], spec: SweepSpec, out: str | Path) -> Path:
    """PNG: the metric against each swept parameter (one panel per parameter; ASHA-stopped
    trials drawn hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(spec.search)
    # Constrained layout and a tight bounding box: titles and labels are never cut at the edge.
    fig, axes = plt.subplots(
        1, len(keys), figsize=(max(4.2 * len(keys), 5.0), 3.8), squeeze=False, layout="constrained"
    )
    for ax, key in zip(axes[0], keys):
        values = [r["params"].get(key) for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({_fmt(v) for v in values}) if not numeric else None
        for r, v in zip(rows, values):
            if r["metric"] is None:
                continue
            x = v if numeric else labels.index(_fmt(v))
            ax.scatter([x], [r["metric"]], s=46, facecolors="none" if r["stopped_early"] else "tab:blue",
                       edgecolors="tab:blue")  # fmt: skip
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=20)
        elif min(values) > 0 and max(values) / min(values) > 50:  # e.g. learning rates
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(spec.metric)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"sweep '{spec.name}'\n{len(rows)} trials; filled: ran to the end, hollow: stopped early by ASHA",
        fontsize=10,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return out

"""Running a sweep: the Tuner over `trainable.run_trial`, its MLflow parent run, and resuming.

A sweep lives in `<storage>/<name>/`: Tune's experiment state, `sweep.json` (the spec, the base
config, the parent MLflow run) and `trials/trial-<id>/` (each trial's training run).

In MLflow the sweep is a parent run named after it: its params are the search space
(`search.<key>`) and the config every trial shares (searched keys left out), its artifacts the
spec as run (command-line overrides applied) and, at the end, the comparison plot; its summary
is the best trial (tags best_trial_id/best_trial_name, metric sweep/best_score) and how many
trials ASHA stopped early or failed. Each trial is a child run (see trainable.py). After Tune
returns each child gets its final status: FINISHED (with `tune.stopped_early=true` when ASHA
stopped it: a decision, not a failure), FAILED with the error, or KILLED when the sweep was
interrupted. The best trial's checkpoint is logged as its MLflow model (and registered under
`tracking.registered_model` when set).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..console import ensure_ray
from ..errors import UserError
from ..tracking import (
    RunLogger,
    check_tracking_uri,
    get_run,
    metric_history,
    resolve_tracking_uri,
    run_context_tags,
    ui_command,
    ui_url,
)
from ..train import storage
from .results import SWEEP_FILE
from .spec import VARIANT, SweepSpec, base_config, param_space, parse_spec, space_of
from .trainable import SCORE, TRIALS_DIR, run_trial, trial_run_name

TUNE_NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"  # "0": Tune's legacy output engine
TRIAL_CPU = 0.01  # the trial function only drives its TorchTrainer


@dataclass
class SweepOutcome:
    sweep_dir: str
    mlflow_uri: str
    parent_run_id: str
    trials: list[dict[str, Any]]  # see results.trial_rows
    interrupted: bool = False


def _planned_trials(spec: SweepSpec) -> int:
    """Trials the sweep will run: num_samples times the size of the grid."""
    n = spec.num_samples
    for key, space in spec.search.items():
        kind, values = space_of(key, space, spec.source)
        if kind == "grid" or (kind == "choice" and spec.search_alg == "grid"):
            n *= len(values)
    return n


def sweep_dir_of(storage_path: str, name: str) -> str:
    return storage.join(storage.absolute(storage_path), name)


def _train_overrides(spec: SweepSpec) -> dict[str, Any]:
    """Config overrides every trial gets from the spec's resources."""
    resources = spec.resources
    train_overrides: dict[str, Any] = {}
    if resources.workers is not None:
        train_overrides["train.num_workers"] = resources.workers
    if resources.cpus_per_worker is not None:
        train_overrides["train.cpus_per_worker"] = resources.cpus_per_worker
    if resources.gpus_per_worker:
        train_overrides["train.use_gpu"] = True
    return train_overrides


def _context(
    spec: SweepSpec, cfg: Config, sweep_dir: str, uri: str, parent_run_id: str
) -> dict[str, Any]:
    return {
        "sweep": spec.name,
        "config": cfg.to_dict(),
        "sweep_dir": sweep_dir,
        "mlflow_uri": uri,
        "parent_run_id": parent_run_id,
        "metric": spec.metric,
        "mode": spec.mode,
        "num_samples": spec.num_samples,
        "search_keys": list(spec.search),  # the order of the values in a trial's name
        "train_overrides": _train_overrides(spec),
        "context_tags": run_context_tags(),  # the command's source and git commit, on every trial
    }


def searched_keys(spec: SweepSpec) -> set[str]:
    """The config keys a sweep varies (a variant's keys included)."""
    keys = {k for k in spec.search if k != VARIANT}
    if VARIANT in spec.search:
        _, values = space_of(VARIANT, spec.search[VARIANT], spec.source)
        keys.update(k for v in values for k in v)
    return keys


def fixed_params(spec: SweepSpec, cfg: Config, sweep_dir: str) -> dict[str, Any]:
    """The config every trial shares, as dotted params: the base config with what the sweep sets
    for each trial (checkpoint metric, resources, storage), the searched keys left out."""
    from ..config import apply_overrides

    shared = {
        "train.checkpoint_metric": spec.metric,
        "train.checkpoint_mode": spec.mode,
        "train.storage_path": storage.join(sweep_dir, TRIALS_DIR),
        **_train_overrides(spec),
    }
    varied = searched_keys(spec) | {"train.run_name"}
    return {k: v for k, v in apply_overrides(cfg, shared).flat().items() if k not in varied}


def effective_spec_yaml(spec: SweepSpec, overrides: list[str] | dict[str, Any] | None) -> str:
    """The spec as it runs: the command-line overrides written into its `config` (searched keys
    pinned on the command line are already out of `search`)."""
    import copy

    import yaml

    from ..config import parse_override

    items = (
        overrides
        if isinstance(overrides, dict)
        else dict(parse_override(o) for o in overrides or [])
    )
    data = spec.to_dict()
    data.pop("source", None)
    config = copy.deepcopy(data["config"])
    for key, value in items.items():
        *sections, leaf = key.split(".")
        node = config
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    data["config"] = config
    given = ", ".join(f"{k}={v}" for k, v in items.items()) or "none"
    header = (
        f"# sweep spec {spec.source} as run; command-line overrides applied to config: {given}\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False)


def _tuner(spec: SweepSpec, cfg: Config, context: dict[str, Any], restore_path: str | None = None):
    from ray import tune

    from .events import TrialEvents

    trainable = tune.with_resources(
        tune.with_parameters(_trial, context=context), {"CPU": TRIAL_CPU}
    )
    if restore_path:
        return tune.Tuner.restore(
            restore_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    if spec.scheduler.type == "asha":
        from .scheduler import ResumableASHA

        scheduler = ResumableASHA(
            time_attr="iteration",
            max_t=spec.scheduler.max_t or cfg.solver.max_iter,
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    else:
        from ray.tune.schedulers import FIFOScheduler

        scheduler = FIFOScheduler()
    search_alg = None
    if spec.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:
            raise UserError(
                f"sweep spec {spec.source}: search_alg optuna needs `pip install optuna` ({e})"
            ) from e
        search_alg = OptunaSearch(seed=spec.seed)
    elif spec.seed is not None:
        from ray.tune.search import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=spec.seed)
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=os.path.dirname(context["sweep_dir"]),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            # Our one line per trial event instead of Tune's status tables.
            verbose=0,
            callbacks=[
                TrialEvents(
                    list(spec.search),
                    spec.metric,
                    spec.mode,
                    spec.scheduler.max_t or cfg.solver.max_iter,
                    "ASHA" if spec.scheduler.type == "asha" else "the scheduler",
                )
            ],
        ),
    )


def _trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    run_trial(params, context)


def _check_capacity(spec: SweepSpec, cfg: Config) -> None:
    """Fails in seconds when the cluster cannot hold the trials that would run at once plus a
    CPU for their data (see capacity.py)."""
    from ..capacity import check_capacity, sweep_reservation

    r = spec.resources
    reservation = sweep_reservation(
        concurrent_trials=min(spec.max_concurrent_trials, _planned_trials(spec)),
        workers=r.workers if r.workers is not None else cfg.train.num_workers,
        cpus_per_worker=r.cpus_per_worker
        if r.cpus_per_worker is not None
        else cfg.train.cpus_per_worker,
        gpus_per_worker=1.0 if r.gpus_per_worker else 0.0,  # a trial's worker with a GPU holds one
        trial_cpus=TRIAL_CPU,
    )
    check_capacity(reservation, f"sweep '{spec.name}'")


def run_sweep(
    spec: SweepSpec,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    storage_path: str | None = None,
    mlflow_uri: str | None = None,
    address: str | None = None,
) -> SweepOutcome:
    """Checks everything, starts the sweep and blocks until every trial has ended."""
    cfg = base_config(spec, overrides)
    root = storage_path or cfg.train.storage_path
    sweep_dir = sweep_dir_of(root, spec.name)
    if storage.exists(storage.join(sweep_dir, SWEEP_FILE)):
        raise UserError(
            f"sweep '{spec.name}' already exists in {storage.absolute(root)}: resume it with "
            f"`tensormask-ray sweep --resume {spec.name}`, or give the new one another name (--name)"
        )
    if spec.metric.startswith("val/") and not cfg.data.val_shards:
        raise UserError(
            f"sweep spec {spec.source}: 'metric' {spec.metric} needs validation data: give "
            "data.val_shards=DIR (on the command line or in the spec's config), or use metric: train/loss"
        )
    from ..train.trainer import check_run

    check_run(cfg, resume=False)  # shards, categories: before Ray starts
    ensure_ray(address)
    _check_capacity(
        spec, cfg
    )  # before anything is recorded: a sweep that cannot run leaves no trace
    uri = resolve_tracking_uri(mlflow_uri or cfg.tracking.mlflow_uri)
    check_tracking_uri(uri)
    parent = RunLogger.create(
        uri, cfg.tracking.experiment, spec.name, tags={"sweep": spec.name, "sweep_dir": sweep_dir}
    )
    # Params: the search space (`search.<key>`, as JSON), the sweep's settings and the config
    # every trial shares (a searched key's base value would read as fixed: left out).
    parent.log_params({f"search.{k}": json.dumps(v) for k, v in spec.search.items()})
    parent.log_params(
        {
            "metric": spec.metric,
            "mode": spec.mode,
            "scheduler": spec.scheduler.type,
            "search_alg": spec.search_alg,
            "num_samples": spec.num_samples,
        }
    )
    parent.log_params(fixed_params(spec, cfg, sweep_dir))
    parent.log_text(effective_spec_yaml(spec, overrides), "sweep_spec.yaml")
    parent.log_text(cfg.to_yaml(), "base_config.yaml")
    record = {
        "spec": spec.to_dict(),
        "config": cfg.to_dict(),
        "mlflow_uri": uri,
        "parent_run_id": parent.run_id,
    }
    storage.write_json(storage.join(sweep_dir, SWEEP_FILE), record)
    print(
        f"[sweep] '{spec.name}' in {sweep_dir}; MLflow parent run {parent.run_id} ({uri})",
        flush=True,
    )
    context = _context(spec, cfg, sweep_dir, uri, parent.run_id)
    return _fit(_tuner(spec, cfg, context), spec, cfg, sweep_dir, uri, parent)


def resume_sweep(
    name: str,
    *,
    storage_path: str = "runs",
    address: str | None = None,
    mlflow_uri: str | None = None,
) -> SweepOutcome:
    """Continues an interrupted sweep (Tuner.restore): finished trials are kept, unfinished and
    errored ones run again (their training runs resume from their latest checkpoints)."""
    from ray import tune

    from ..config import from_dict

    sweep_dir = sweep_dir_of(storage_path, name)
    record = (
        storage.read_json(storage.join(sweep_dir, SWEEP_FILE))
        if storage.exists(storage.join(sweep_dir, SWEEP_FILE))
        else None
    )
    if record is None:
        raise UserError(
            f"--resume: no sweep '{name}' in {storage.absolute(storage_path)} (no {SWEEP_FILE})"
        )
    if not tune.Tuner.can_restore(sweep_dir):
        raise UserError(
            f"--resume: sweep '{name}' in {sweep_dir} has no Tune state to restore (it never started)"
        )
    spec = parse_spec(
        {k: v for k, v in record["spec"].items() if k != "source"},
        record["spec"].get("source", SWEEP_FILE),
    )
    cfg = from_dict(record["config"])
    uri = record["mlflow_uri"]
    if mlflow_uri and resolve_tracking_uri(mlflow_uri) != uri:
        raise UserError(
            f"--resume {name}: the sweep logs to {uri} (its parent run is there), not {mlflow_uri}"
        )
    check_tracking_uri(uri)
    ensure_ray(address)
    _check_capacity(spec, cfg)
    parent = RunLogger(uri, record["parent_run_id"])
    parent.reopen()
    resumes = int(get_run(uri, parent.run_id).data.tags.get("resumes", "0")) + 1
    parent.set_tags({"interrupted": "resumed", "resumes": resumes})
    print(
        f"[sweep] resuming '{name}' in {sweep_dir}; MLflow parent run {parent.run_id}", flush=True
    )
    context = _context(spec, cfg, sweep_dir, uri, parent.run_id)
    return _fit(
        _tuner(spec, cfg, context, restore_path=sweep_dir), spec, cfg, sweep_dir, uri, parent
    )


@contextmanager
def _tune_output_off() -> Iterator[None]:
    """Tune's output engine off while the block runs. RunConfig(verbose=0) silences its status
    tables but not the experiment's opening box, its results path and tensorboard lines, which
    Ray 2.60's output engine prints at any verbosity; the legacy engine (Ray's documented
    RAY_AIR_NEW_OUTPUT=0) prints nothing at verbose 0."""
    saved = os.environ.get(TUNE_NEW_OUTPUT_ENV)
    os.environ[TUNE_NEW_OUTPUT_ENV] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(TUNE_NEW_OUTPUT_ENV, None)
        else:
            os.environ[TUNE_NEW_OUTPUT_ENV] = saved


def _fit(
    tuner, spec: SweepSpec, cfg: Config, sweep_dir: str, uri: str, parent: RunLogger
) -> SweepOutcome:
    from ..console import hide_worker_lines
    from .results import trial_rows

    t0 = time.time()
    try:
        # each trial's training progress: in the log file; Tune's own output: none (our
        # TrialEvents lines instead)
        with hide_worker_lines("[train]"), _tune_output_off():
            tuner.fit()
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            parent.set_tags({"interrupted": "true"})
            parent.end("KILLED")
        else:
            parent.log_error(e)
            parent.end("FAILED")
        raise
    rows = trial_rows(spec.name, storage_path=os.path.dirname(sweep_dir))
    _finish_trial_runs(rows, uri, spec)
    from .results import format_table

    unfinished = [r for r in rows if r["status"] not in ("TERMINATED", "ERROR")]
    if unfinished or len(rows) < _planned_trials(spec):
        # Interrupted (Ctrl-C, SIGINT, SIGTERM): Tune saved its state; nothing is lost.
        parent.set_tags({"interrupted": "true"})
        parent.end("KILLED")
        print(format_table(rows, spec), flush=True)
        print(f"[sweep] interrupted with {len(unfinished)} trial(s) unfinished; continue with "
              f"`tensormask-ray sweep --resume {spec.name} --storage-path {os.path.dirname(sweep_dir)}`", flush=True)  # fmt: skip
        return SweepOutcome(sweep_dir, uri, parent.run_id, rows, interrupted=True)
    best = rows[0] if rows and rows[0]["metric"] is not None else None
    ok = all(r["status"] != "ERROR" for r in rows)
    _summarise(parent, rows, spec, best, time.time() - t0)
    if best and best.get("checkpoint") and best.get("mlflow_run_id") and cfg.tracking.log_model:
        from ..evaluation.mlflow_model import LOADER_MODULE
        from ..train.trainer import publish_model

        version = publish_model(
            RunLogger(uri, best["mlflow_run_id"]),
            best["checkpoint"],
            cfg.tracking.registered_model,
            "sweep",
            model_loader=LOADER_MODULE,
        )
        if version:
            parent.set_tags(
                {"registered_model": f"models:/{cfg.tracking.registered_model}/{version}"}
            )
    parent.end("FINISHED" if ok else "FAILED")
    print(format_table(rows, spec), flush=True)
    print(f"[sweep] see the sweep in MLflow: {ui_command(uri)}", flush=True)
    print(f"[sweep]   then open {ui_url(uri, cfg.tracking.experiment)}", flush=True)
    return SweepOutcome(sweep_dir, uri, parent.run_id, rows)


def _summarise(
    parent: RunLogger,
    rows: list[dict[str, Any]],
    spec: SweepSpec,
    best: dict[str, Any] | None,
    seconds: float,
) -> None:
    """The parent run's summary: the best trial, counts, the table as its description, the plot."""
    import tempfile

    from .results import format_table, plot_metric

    parent.set_tags(
        {
            "best_trial_id": best["trial_id"] if best else "",
            "best_trial_name": best["name"] if best else "",
            "best_run_id": (best or {}).get("mlflow_run_id") or "",
            "best_checkpoint": (best or {}).get("checkpoint") or "",
            "sweep_seconds": f"{seconds:.1f}",
        }
    )
    summary = {
        "sweep/num_trials": len(rows),
        "sweep/num_stopped_early": sum(bool(r["stopped_early"]) for r in rows),
        "sweep/num_failed": sum(r["status"] == "ERROR" for r in rows),
    }
    if best:
        summary["sweep/best_score"] = best["metric"]
    parent.log_metrics(summary, step=0)
    headline = (
        f"Best: **{best['name']}** (trial {best['trial_id']}), {SCORE} = {best['metric']:.6g}\n\n"
        if best
        else ""
    )
    parent.set_note(
        f"Sweep `{spec.name}`: {spec.metric} ({spec.mode}); a trial's `{SCORE}` is its best {spec.metric}, "
        f"what Tune and `tensormask-ray runs compare` rank by.\n\n{headline}```\n{format_table(rows, spec)}\n```\n"
    )
    if any(r["metric"] is not None for r in rows):
        with tempfile.TemporaryDirectory() as tmp:
            parent.log_artifact(plot_metric(rows, spec, f"{tmp}/compare.png"))


def _finish_trial_runs(rows: list[dict[str, Any]], uri: str, spec: SweepSpec) -> None:
    """Final status of each trial's MLflow child run, as seen from the driver (a trial stopped by
    ASHA never gets to close its own run), and its final `sweep/score`: the value `runs compare`
    shows, whatever report a stopped trial was cut off at."""
    for row in rows:
        run_id = row.get("mlflow_run_id")
        if not run_id:
            continue
        logger = RunLogger(uri, run_id)
        run = get_run(uri, run_id)
        logger.set_tags({"tune.status": row["status"]})
        if row["status"] not in ("TERMINATED", "ERROR"):  # interrupted: reopened on --resume
            logger.end("KILLED")
            continue
        if row["status"] == "ERROR":
            if "error" not in run.data.tags:
                logger.log_error(
                    row.get("error")
                    or f"the trial failed (Tune's report: error.txt of trial {row['trial_id']})"
                )
            logger.end("FAILED")
        else:
            logger.set_tags({"tune.stopped_early": str(bool(row["stopped_early"])).lower()})
            # TERMINATED is Tune's word for a trial that completed or that the scheduler stopped:
            # the outcome. The run may still be RUNNING (a trial stopped by ASHA never closes its
            # own run), or FAILED by the trial function itself when Tune, ending the trial after
            # its last report, removed the trial's placement group while trainer.fit() was still
            # returning (ActorDiedError of the Train controller: a teardown race, not a failure).
            if run.info.status != "FINISHED":
                if "error" in run.data.tags:
                    logger.set_tags({"tune.teardown_error": run.data.tags["error"]})
                    logger.client.delete_tag(run_id, "error")
                logger.end("FINISHED")
        if row.get("checkpoint"):
            logger.set_tags({"best_checkpoint": row["checkpoint"]})
        _complete_sweep_metrics(logger, row, spec)


def _complete_sweep_metrics(logger: RunLogger, row: dict[str, Any], spec: SweepSpec) -> None:
    """Every report Tune received, in the trial's run as `sweep/<metric>` and `sweep/score` (the
    trial's callback logs them as they come, but a trial torn down by ASHA may not have logged the
    last), and the ranked value as the last `sweep/score`: a stopped trial's worker may have
    reported once more than Tune took in."""
    reported = f"sweep/{spec.metric}"
    logged = {step for step, _ in metric_history(logger.uri, logger.run_id, reported)}
    best = None
    for step, value in row["reported"]:
        best = (
            value
            if best is None or (value > best if spec.mode == "max" else value < best)
            else best
        )
        if step not in logged:
            logger.log_metrics({reported: value, SCORE: best}, step=step)
    if row["metric"] is None:
        return
    last_step = max(
        (step for step, _ in metric_history(logger.uri, logger.run_id, SCORE)), default=0
    )
    last = get_run(logger.uri, logger.run_id).data.metrics.get(
        SCORE
    )  # MLflow's latest: what the UI shows
    if last is None or not math.isclose(last, row["metric"], rel_tol=1e-9, abs_tol=1e-12):
        logger.log_metrics({SCORE: row["metric"]}, step=max(last_step, row["iterations"]))


__all__ = [
    "SweepOutcome",
    "TRIALS_DIR",
    "resume_sweep",
    "run_sweep",
    "sweep_dir_of",
    "trial_run_name",
]

"""One trial of a sweep: a distributed training run (Ray Train) inside a Tune function trainable.

The trial applies its sampled values to the sweep's base config, opens (or, when Tune restarts the
trial, reopens) its MLflow child run under the sweep's parent run, and fits a TorchTrainer whose
reports reach Tune through `TuneReportCallback` (the Ray 2.60 pattern), so ASHA sees every
checkpoint's metrics and can stop the trial early. Each trial's training run lives in
`<sweep dir>/trials/<trial id>`: Tune restarting a trial (a retry, a resumed sweep) resumes that
training run from its latest checkpoint instead of starting over.

In MLflow a trial is named by its swept values (`head=upscale_aligned lam=5`), and at every
report it logs the sweep's metric as Tune received it (`sweep/<metric>`) and the trial's best
value so far (`sweep/score`, what Tune and `runs compare` rank trials by), so MLflow's columns,
sort and compare view agree with `runs compare`.
"""

from __future__ import annotations

import time
from typing import Any

from ..finite import is_finite_number

TRIALS_DIR = "trials"
STARTS_FILE = "trial_starts.log"  # one line per start of the trial function (retries, resumes)
SCORE = "sweep/score"  # the trial's best value of the sweep's metric so far
# Short names of common swept keys in trial names (the paper's λ is `lam`); others: the key's
# last part.
SHORT_NAMES = {
    "model.mask_head": "head",
    "model.upscale_factor": "lam",
    "model.upscale_mode": "upscale",
    "model.window_sizes": "windows",
    "solver.base_lr": "lr",
    "loss.mask_fg_weight": "fg_weight",
}


def trial_run_name(trial_id: str) -> str:
    """The trial's training run (its folder under `<sweep>/trials/`)."""
    return f"trial-{trial_id}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)


def trial_display_name(
    params: dict[str, Any], trial_id: str, num_samples: int = 1, order: list[str] | None = None
) -> str:
    """A trial's name in MLflow: its swept values in the spec's `order` of search keys, e.g.
    `head=upscale_aligned lam=5` (a variant's keys are spelled out). With several samples per
    point, the trial's number follows (`#3`)."""
    from .spec import trial_overrides

    rank = {key: i for i, key in enumerate(order or [])}
    values = trial_overrides(
        dict(sorted(params.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    )
    names = {key: SHORT_NAMES.get(key, key.rsplit(".", 1)[-1]) for key in values}
    clashes = {n for n in names.values() if list(names.values()).count(n) > 1}
    name = " ".join(
        f"{key if names[key] in clashes else names[key]}={_short(v)}" for key, v in values.items()
    )
    if num_samples > 1:
        name += f" #{int(trial_id.rsplit('_', 1)[-1])}"
    return name or trial_id


def _sweep_metric_logger(uri: str, run_id: str, metric: str, mode: str):
    """A Ray Train callback (it runs in the trial's Train controller) that logs, at every report,
    the sweep's metric as reported (`sweep/<metric>`) and the best value so far (`sweep/score`).
    It logs from a thread of its own: the controller, which also hands the reports to Tune, never
    waits for MLflow (a report reaching ASHA late lets a trial train past its stop). What a torn
    down trial could not log, the sweep driver fills in from Tune's results (sweep.py)."""
    import queue
    import threading

    from ray.train import UserCallback

    def log_reports(reports: queue.Queue) -> None:
        from ..tracking import RunLogger, get_run

        logger = RunLogger(uri, run_id)
        best = get_run(uri, run_id).data.metrics.get(SCORE)  # a restarted trial continues its best
        while True:
            value, step = reports.get()
            best = (
                value if best is None or (value > best if mode == "max" else value < best) else best
            )
            logger.log_metrics({f"sweep/{metric}": value, SCORE: best}, step=step)

    class SweepMetricLogger(UserCallback):
        def __init__(self):
            self.reports: queue.Queue | None = None  # made in the controller (not picklable)

        def after_report(self, run_context, metrics, checkpoint) -> None:
            value, step = metrics[0].get(metric), metrics[0].get("iteration", 0)
            if not is_finite_number(value):
                return  # e.g. val/segm/AP before the first validation
            if self.reports is None:
                self.reports = queue.Queue()
                threading.Thread(
                    target=log_reports,
                    args=(self.reports,),
                    daemon=True,
                    name="sweep-metric-logger",
                ).start()
            self.reports.put((float(value), int(step)))

    return SweepMetricLogger()


def run_trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """params: the sampled values {dotted key: value}; context: what the sweep driver prepared
    (base config dict, sweep dir, MLflow uri, parent run id, resources, metric, run tags)."""
    import ray.data
    import ray.train
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..config import apply_overrides, from_dict
    from ..console import quiet_ray_data
    from ..evaluation.validation import validate_on_shards
    from ..train import storage
    from ..train.checkpoint import MLFLOW_RUN_FILE
    from ..train.trainer import build_trainer, check_run, start_mlflow_run
    from .spec import trial_overrides

    quiet_ray_data()  # progress bars from inside a trial are only noise in the sweep's log
    trial_id = ray.tune.get_context().get_trial_id()
    overrides = {
        **trial_overrides(params),
        "train.storage_path": storage.join(context["sweep_dir"], TRIALS_DIR),
        "train.run_name": trial_run_name(trial_id),
        "train.checkpoint_metric": context["metric"],
        "train.checkpoint_mode": context["mode"],
        **context["train_overrides"],
    }
    cfg = apply_overrides(from_dict(context["config"]), overrides).validate()
    run_dir = storage.join(context["sweep_dir"], TRIALS_DIR, cfg.train.run_name)
    resume = storage.exists(storage.join(run_dir, MLFLOW_RUN_FILE))
    store, run_dir, categories = check_run(cfg, resume)
    starts = storage.read_text(storage.join(run_dir, STARTS_FILE)) or ""
    storage.write_text(storage.join(run_dir, STARTS_FILE), starts + f"{time.time():.3f}\n")

    uri = context["mlflow_uri"]
    logger = start_mlflow_run(
        cfg, run_dir, uri, resume,
        tags={"mlflow.parentRunId": context["parent_run_id"], "sweep": context["sweep"], "tune.trial_id": trial_id},
        run_name=trial_display_name(params, trial_id, context["num_samples"], context["search_keys"]),
        context_tags=context.get("context_tags"),
    )  # fmt: skip
    if not resume:
        logger.log_params({f"sweep.{k}": v for k, v in params.items()})
    # Tune first: ASHA's decisions wait for nothing else.
    callbacks = [
        TuneReportCallback(),
        _sweep_metric_logger(uri, logger.run_id, context["metric"], context["mode"]),
    ]
    trainer = build_trainer(
        cfg,
        store,
        categories,
        uri,
        logger.run_id,
        callbacks=callbacks,
        validation=validate_on_shards,
    )
    try:
        result = trainer.fit()
        error = result.error
    except Exception as e:  # noqa: BLE001 - recorded in MLflow, then re-raised
        error = e
    if error is not None:
        logger.log_error(error)
        logger.end("FAILED")
        raise error
    logger.set_tags({"checkpoint": (result.metrics or {}).get("checkpoint_path", "")})
    logger.end("FINISHED")

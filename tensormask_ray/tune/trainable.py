"""One trial of a sweep: a distributed training run (Ray Train) inside a Tune function trainable.

The trial applies its sampled values to the sweep's base config, opens (or, when Tune restarts the
trial, reopens) its MLflow child run under the sweep's parent run, and fits a TorchTrainer whose
reports reach Tune through `TuneReportCallback` (the Ray 2.60 pattern), so ASHA sees every
checkpoint's metrics and can stop the trial early. Each trial's training run lives in
`<sweep dir>/trials/<trial id>`: Tune restarting a trial (a retry, a resumed sweep) resumes that
training run from its latest checkpoint instead of starting over.
"""

from __future__ import annotations

import time
from typing import Any

TRIALS_DIR = "trials"
STARTS_FILE = "trial_starts.log"  # one line per start of the trial function (retries, resumes)


def trial_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def run_trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """params: the sampled values {dotted key: value}; context: what the sweep driver prepared
    (base config dict, sweep dir, MLflow uri, parent run id, resources, metric)."""
    import ray.data
    import ray.train
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..config import apply_overrides, from_dict
    from ..train import storage
    from ..train.trainer import MLFLOW_RUN_FILE, build_trainer, check_run, start_mlflow_run
    from .spec import trial_overrides

    # Progress bars from inside a trial are only noise in the sweep's log.
    ray.data.DataContext.get_current().enable_progress_bars = False
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

    logger = start_mlflow_run(
        cfg, run_dir, context["mlflow_uri"], resume,
        tags={"mlflow.parentRunId": context["parent_run_id"], "sweep": context["sweep"], "trial_id": trial_id},
    )  # fmt: skip
    if not resume:
        logger.log_params({f"sweep.{k}": v for k, v in params.items()})
    logger.set_tags({"status": "RUNNING"})
    trainer = build_trainer(cfg, store, categories, context["mlflow_uri"], logger.run_id, callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error:
        logger.set_tags({"status": "FAILED", "error": f"{type(result.error).__name__}: {result.error}"[:5000]})
        logger.end("FAILED")
        raise result.error
    logger.set_tags({"status": "FINISHED", "checkpoint": (result.metrics or {}).get("checkpoint_path", "")})
    logger.end("FINISHED")

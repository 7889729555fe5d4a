"""The driver's final word on each trial's MLflow run (tune.sweep._finish_trial_runs): Tune's
status decides. A trial that completed can see its Train controller torn down as Tune ends it
(ActorDiedError raised from trainer.fit() after the last report; it happened in CI), and its own
code then marks its run FAILED: the driver must put it back to FINISHED, keeping the error as
`tune.teardown_error`. A trial Tune reports as ERROR stays FAILED with its error."""

from __future__ import annotations

import mlflow

from tensormask_ray.tracking import RunLogger, get_run
from tensormask_ray.tune.spec import parse_spec
from tensormask_ray.tune.sweep import _finish_trial_runs

SPEC = parse_spec(
    {
        "name": "s",
        "search": {"solver.base_lr": {"grid": [0.1, 0.01]}},
        "metric": "train/loss",
        "mode": "min",
    }
)


def _trial_run(uri: str, status: str, error: str | None) -> str:
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("trials")
    run_id = client.create_run(exp).info.run_id
    logger = RunLogger(uri, run_id)
    logger.log_metrics({"sweep/train/loss": 3.0, "sweep/score": 3.0}, step=4)
    if error:
        logger.log_error(error)
    if status != "RUNNING":
        logger.end(status)
    return run_id


def _row(run_id: str, status: str) -> dict:
    return {"mlflow_run_id": run_id, "status": status, "stopped_early": False, "trial_id": "t0",
            "reported": [(4, 3.0), (8, 2.5)], "metric": 2.5, "iterations": 8, "checkpoint": ""}  # fmt: skip


def test_a_completed_trial_failed_by_its_teardown_ends_finished(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    race = "ActorDiedError: The actor died unexpectedly before finishing this task."
    run_id = _trial_run(uri, "FAILED", race)
    _finish_trial_runs([_row(run_id, "TERMINATED")], uri, SPEC)
    run = get_run(uri, run_id)
    assert run.info.status == "FINISHED"
    assert "error" not in run.data.tags and run.data.tags["tune.teardown_error"] == race
    assert run.data.tags["tune.stopped_early"] == "false" and run.data.metrics["sweep/score"] == 2.5


def test_a_trial_tune_reports_failed_stays_failed_with_its_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = _trial_run(uri, "RUNNING", None)
    row = {**_row(run_id, "ERROR"), "error": "ValueError: loss is nan"}
    _finish_trial_runs([row], uri, SPEC)
    run = get_run(uri, run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "ValueError: loss is nan"

"""A 4-trial smoke sweep on CPU, run the way a user runs it: `tensormask-ray sweep` is interrupted
(SIGINT) once its first trial has finished, then `tensormask-ray sweep --resume` completes it.
The finished sweep is then checked: ASHA stopped trials early, MLflow holds the parent run and 4
child runs with params, metrics and statuses, `runs compare` prints the table and writes the PNG,
the best checkpoint (`runs best`, `evaluate --best-of`) loads and evaluates, and MLflow's UI
(through a real `mlflow server`) shows the trials by their values, ranked as `runs compare`
ranks them, with the summary, the evaluation run and the registered best model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tensormask_ray.evaluation.coco import METRIC_NAMES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MAX_ITER = 12
NAME = "smoke-test"


def _spec(shards: Path) -> dict:
    return {
        "name": NAME,
        "preset": "cpu-small",
        "config": {
            "model": {"num_classes": 4},
            "data": {"train_shards": str(shards), "batch_size_per_worker": 1},
            "input": {
                "min_size_train": [128, 160],
                "max_size_train": 160,
                "min_size_test": 160,
                "max_size_test": 160,
            },
            # max_iter: made MAX_ITER on the command line (the parent's spec artifact shows it)
            "solver": {
                "optimizer": "adamw",
                "base_lr": 0.001,
                "max_iter": 2 * MAX_ITER,
                "warmup_iters": 1,
                "steps": [],
            },
            "train": {"checkpoint_period": 4, "log_period": 4, "keep_checkpoints": 1},
            "tracking": {"registered_model": "smoke-best"},
        },
        # One trial at a time, in grid order (the last key varies fastest): box weight 1, 20, 1,
        # 20. ASHA compares each trial at iterations 4 and 8 with those before it. A box weight
        # of 20 multiplies the box term of the loss (about 2.4 of 5 here) by 20, so those trials
        # are far above the first rung's cut-off whatever a few iterations do: both stop at 4,
        # deterministically. The second trial is the one interrupted: stopping it after the
        # resume needs the first rung rebuilt from the first trial's results (ResumableASHA).
        "search": {
            "loss.mask_fg_weight": {"grid": [1.5, 1.0]},
            "loss.box_weight": {"grid": [1.0, 20.0]},
        },
        "metric": "train/loss",
        "mode": "min",
        "scheduler": {"type": "asha", "grace_period": 4, "reduction_factor": 2},
        "resources": {"workers": 1, "cpus_per_worker": 0.5},
        "max_concurrent_trials": 1,
        "max_failures": 1,
    }


def _env() -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    env.pop("RAY_ADDRESS", None)
    return env


def _cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tensormask_ray.cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, synth_shards, mlflow_store):
    work = tmp_path_factory.mktemp("sweep")
    spec = work / "smoke.yaml"
    spec.write_text(yaml.safe_dump(_spec(synth_shards)))
    storage, uri = work / "runs", mlflow_store["uri"]
    common = [
        f"solver.max_iter={MAX_ITER}",
        "--storage-path",
        str(storage),
        "--mlflow-uri",
        uri,
        "--address",
        "local",
    ]
    trials = storage / NAME / "trials"

    # 1. start, and interrupt once the first trial has finished and the second has begun
    log = open(work / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tensormask_ray.cli", "sweep", str(spec), *common],
                            cwd=work, env=_env(), stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        started = sorted(trials.glob("trial-*")) if trials.is_dir() else []
        done = [t for t in started if (t / f"checkpoint_{MAX_ITER:07d}").is_dir()]
        if done and len(started) >= 2:
            break
        time.sleep(1)
    assert proc.poll() is None, (work / "first.log").read_text()[-3000:]
    proc.send_signal(signal.SIGINT)
    first_rc = proc.wait(timeout=180)
    log.close()
    first_log = (work / "first.log").read_text()
    first_trial = done[0].name

    # 2. resume
    resumed = _cli(
        "sweep", "--resume", NAME, "--storage-path", str(storage), "--address", "local", cwd=work
    )
    return {"work": work, "storage": storage, "uri": uri, "first_rc": first_rc, "first_log": first_log,
            "first_trial": first_trial, "resumed": resumed, "trials": trials}  # fmt: skip


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep):
    assert sweep["first_rc"] == 130, sweep["first_log"][-3000:]
    assert f"--resume {NAME}" in sweep["first_log"]
    # the terminal shows our trial lines, not Tune's experiment box or its tensorboard hint
    for shown in (sweep["first_log"], sweep["resumed"].stdout + sweep["resumed"].stderr):
        assert "[sweep] trial" in shown
        assert "Configuration for experiment" not in shown and "tensorboard" not in shown.lower()
    r = sweep["resumed"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (
        "[sweep] resuming" in r.stdout and r.stdout.count("stopped early (ASHA)") == 2
    )  # the final table
    runs = sorted(sweep["trials"].glob("trial-*"))
    assert len(runs) == 4
    starts = {p.name: len((p / "trial_starts.log").read_text().split()) for p in runs}
    assert starts[sweep["first_trial"]] == 1, starts  # the finished trial did not run again
    assert sum(starts.values()) == 5, starts  # only the interrupted one started twice


def test_asha_stops_trials_early_and_the_table_shows_it(sweep):
    from tensormask_ray.tune.results import trial_rows

    rows = trial_rows(NAME, storage_path=str(sweep["storage"]))
    assert len(rows) == 4 and all(r["status"] == "TERMINATED" for r in rows)
    stopped = [r for r in rows if r["stopped_early"]]
    assert all(r["iterations"] < MAX_ITER for r in stopped)
    # ... and their training runs were torn down: they never trained to the end. (Not exactly at
    # the stop: the worker keeps training for the second or two Tune takes to end the trial.)
    for r in stopped:
        assert r["iterations"] == 4  # the first rung: 8 iterations left, far more than that second
        assert not (Path(r["run_dir"]) / f"checkpoint_{MAX_ITER:07d}").exists()
    # Both heavy trials stop at the first rung, the one resumed after the interruption too: its
    # rung holds the first trial's value again (ResumableASHA replays it on restore).
    assert len(stopped) == 2 and all(r["params"]["loss.box_weight"] == 20.0 for r in stopped)
    light = [r for r in rows if r["params"]["loss.box_weight"] == 1.0]
    assert len(light) == 2 and all(
        r["iterations"] == MAX_ITER and not r["stopped_early"] for r in light
    )
    assert rows[0]["params"]["loss.box_weight"] == 1.0  # best first (train/loss, min)
    assert [r["metric"] for r in rows] == sorted(r["metric"] for r in rows)

    out = sweep["work"] / "compare.png"
    r = _cli(
        "runs",
        "compare",
        NAME,
        "--storage-path",
        str(sweep["storage"]),
        "--out",
        str(out),
        cwd=sweep["work"],
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("stopped early (ASHA)") == len(stopped)
    for row in rows:
        assert row["trial_id"] in r.stdout
    assert r.stdout.index(rows[0]["trial_id"]) < r.stdout.index(rows[-1]["trial_id"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_mlflow_holds_the_parent_and_four_child_runs(sweep):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sweep["uri"])
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], max_results=100
    )
    parents = [r for r in runs if r.info.run_name == NAME]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["interrupted"] == "resumed" and parent.data.tags["resumes"] == "1"
    assert "search.loss.box_weight" in parent.data.params and parent.data.tags["best_checkpoint"]
    assert parent.data.params["model.mask_head"] == "bipyramid"  # the config the trials share
    assert "loss.box_weight" not in parent.data.params  # searched: not a fixed value
    assert parent.data.tags["sweep"] == NAME and parent.data.tags["sweep_dir"] == str(
        sweep["storage"] / NAME
    )
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    for child in children:
        assert child.data.params["sweep.loss.box_weight"] in ("1.0", "20.0")
        assert child.data.params["model.mask_head"] == "bipyramid"  # the full config
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert len(history) >= 1
        early = child.data.tags.get("tune.stopped_early") == "true"
        assert child.info.status == "FINISHED"  # stopped by ASHA is a decision, not a failure
        # Stopping the Tune trial tore its training down before the end.
        assert (
            max(m.step for m in history) < MAX_ITER
            if early
            else max(m.step for m in history) == MAX_ITER
        )
        assert child.data.tags["best_checkpoint"].endswith(
            tuple(f"checkpoint_{i:07d}" for i in range(1, MAX_ITER + 1))
        )
    assert sum(c.data.tags.get("tune.stopped_early") == "true" for c in children) >= 1


def test_the_best_checkpoint_loads_and_evaluates(sweep, synth_shards):
    from tensormask_ray.train.checkpoint import load_model_for_inference

    r = _cli("runs", "best", NAME, "--storage-path", str(sweep["storage"]), cwd=sweep["work"])
    assert r.returncode == 0, r.stderr
    path = next(
        line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("checkpoint: ")
    )
    assert "loss.box_weight=1.0" in r.stdout and "mask_head: bipyramid" in r.stdout
    model, cfg, categories = load_model_for_inference(path)
    assert cfg.loss.box_weight == 1.0 and len(categories) == 4

    out = sweep["work"] / "eval"
    r = _cli("evaluate", "--best-of", NAME, "--sweep-storage", str(sweep["storage"]), "--shards", str(synth_shards),
             "--max-images", "4", "--num-actors", "0", "--out", str(out), "--mlflow-uri", sweep["uri"], cwd=sweep["work"])  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads((out / "metrics.json").read_text())
    # the sweep's best checkpoint, evaluated on the 4 images, with every COCO metric of both kinds
    assert (
        Path(summary["checkpoint"]).resolve() == Path(path).resolve() and summary["num_images"] == 4
    )
    assert set(summary["metrics"]) == {f"{t}/{n}" for t in ("segm", "bbox") for n in METRIC_NAMES}


def test_the_api_compares_finds_and_evaluates_the_best_trial_as_the_files_say(sweep, synth_shards):
    """`tensormask_ray.api` on the finished sweep: compare, best_trial and evaluate(best_of=...)
    return what the sweep's folder holds (not logged to MLflow: the test below counts runs)."""
    from tensormask_ray import api
    from tensormask_ray.tune.results import trial_rows

    storage = str(sweep["storage"])
    rows = trial_rows(NAME, storage)
    compared = api.compare(NAME, storage_path=storage, plot=sweep["work"] / "api-compare.png")
    assert list(compared.trials) == rows and compared.plot == sweep["work"] / "api-compare.png"
    assert compared.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(r["trial_id"] in compared.table for r in rows)

    best = api.best_trial(NAME, storage_path=storage)
    top = rows[0]
    assert (best.trial_id, best.checkpoint, best.metric) == (
        top["trial_id"],
        top["checkpoint"],
        top["metric"],
    )
    assert best.metric_name == "train/loss" and best.params == top["params"]
    assert (Path(top["run_dir"]) / "mlflow_run_id").read_text().strip() == best.mlflow_run_id
    assert best.iteration == int(Path(best.checkpoint).name.removeprefix("checkpoint_"))
    assert best.config.loss.box_weight == best.params["loss.box_weight"]

    out = sweep["work"] / "api-eval"
    result = api.evaluate(
        best_of=NAME,
        sweep_storage=storage,
        shards=synth_shards,
        output_dir=out,
        max_images=2,
        execution=api.Execution(num_actors=0),
        log_to_mlflow=False,
    )
    assert Path(result.checkpoint).resolve() == Path(best.checkpoint).resolve()
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["checkpoint"] == result.checkpoint and result.num_images == 2
    assert result.metrics == summary["metrics"] and result.mlflow_run_id is None


def test_the_mlflow_ui_ranks_the_trials_as_runs_compare_does(
    sweep, mlflow_store, mlflow_server, synth_shards
):
    """Last in this module: the evaluation run of the test above is part of what is checked."""
    from tensormask_ray import cli
    from tensormask_ray.tune.results import trial_rows
    from tests.mlflow_server import datasets, metrics, params, tags

    rest = mlflow_server
    rows = trial_rows(NAME, storage_path=str(sweep["storage"]))
    experiment = rest.experiment("tensormask")
    assert experiment["artifact_location"].startswith(
        (mlflow_store["dir"] / "mlartifacts").as_uri()
    )
    assert not (sweep["work"] / "mlruns").exists()  # nothing in the directory the sweep ran from
    parent = next(
        r for r in rest.search_runs(experiment["experiment_id"], f"attributes.run_name = '{NAME}'")
    )
    parent_id = parent["info"]["run_id"]
    trials = rest.search_runs(
        experiment["experiment_id"],
        f"tags.mlflow.parentRunId = '{parent_id}'",
        ["metrics.`sweep/score` ASC"],
    )

    # named by their values; ASHA-stopped = FINISHED + tune.stopped_early; no stale status tag
    by_run = {r["mlflow_run_id"]: r for r in rows}
    # (the spec file's order of keys: yaml.safe_dump sorted them)
    assert {t["info"]["run_name"] for t in trials} == {
        f"box_weight={b} fg_weight={f}" for f in ("1.5", "1") for b in ("1", "20")
    }
    for trial in trials:
        row, tag = by_run[trial["info"]["run_id"]], tags(trial)
        assert trial["info"]["run_name"] == row["name"] and trial["info"]["status"] == "FINISHED"
        assert (
            tag["tune.stopped_early"] == str(row["stopped_early"]).lower() and "status" not in tag
        )
        # the sweep's metric at every report Tune received, and the ranked value as sweep/score
        reported = [
            m["step"] for m in rest.metric_history(trial["info"]["run_id"], "sweep/train/loss")
        ]
        assert set(range(4, row["iterations"] + 1, 4)) <= set(reported), reported
        assert metrics(trial)["sweep/score"] == pytest.approx(row["metric"], rel=1e-9)
        assert [
            d["name"]
            for d, context in datasets(trial)
            if context["mlflow.data.context"] == "training"
        ] == [synth_shards.name]
        assert tag["mlflow.source.name"] and tag["mlflow.user"]
    # sorting by sweep/score in MLflow gives runs compare's order
    assert [t["info"]["run_id"] for t in trials] == [r["mlflow_run_id"] for r in rows]

    # the parent: the space as params, the fixed config (the effective one), the summary
    p, tag, summary = params(parent), tags(parent), metrics(parent)
    assert p["search.loss.box_weight"] == '{"grid": [1.0, 20.0]}' and "loss.box_weight" not in p
    assert p["solver.max_iter"] == str(MAX_ITER) and p["train.checkpoint_metric"] == "train/loss"
    assert tag["best_trial_id"] == rows[0]["trial_id"] and tag["best_trial_name"] == rows[0]["name"]
    assert (
        summary["sweep/best_score"] == pytest.approx(rows[0]["metric"])
        and summary["sweep/num_stopped_early"] == 2
    )
    assert rows[0]["name"] in tag["mlflow.note.content"]  # the table as the run's description
    assert {"compare.png", "sweep_spec.yaml", "base_config.yaml"} <= rest.artifacts(parent_id)
    spec = yaml.safe_load(rest.artifact_text(parent_id, "sweep_spec.yaml"))
    assert spec["config"]["solver"]["max_iter"] == MAX_ITER  # the command line's value

    # the best trial's checkpoint: logged, registered, and `runs register` adds a version of it
    best = rest.run(rows[0]["mlflow_run_id"])
    model_id = best["outputs"]["model_outputs"][0]["model_id"]
    assert rest.model_version("smoke-best", "1")["source"] == f"models:/{model_id}"
    assert (
        cli.main(
            [
                "runs",
                "register",
                NAME,
                "--storage-path",
                str(sweep["storage"]),
                "--name",
                "smoke-registered",
            ]
        )
        == 0
    )
    again = rest.model_version("smoke-registered", "1")
    assert again["source"] == f"models:/{model_id}" and again["run_id"] == rows[0]["mlflow_run_id"]

    # the evaluation of `evaluate --best-of`: its own run, nested under the best trial
    evaluations = rest.search_runs(
        experiment["experiment_id"], f"tags.mlflow.parentRunId = '{rows[0]['mlflow_run_id']}'"
    )
    assert len(evaluations) == 1
    evaluation = evaluations[0]
    assert (
        evaluation["info"]["run_name"]
        == f"eval {Path(rows[0]['checkpoint']).name} {synth_shards.name}"
    )
    assert evaluation["info"]["status"] == "FINISHED"
    assert {"metrics.json", "detections.json"} <= rest.artifacts(evaluation["info"]["run_id"])
    # every COCO figure of its metrics.json logged under eval/ with the same value (-1, no ground
    # truth of that size, is not a score and is not logged)
    stored = json.loads(rest.artifact_text(evaluation["info"]["run_id"], "metrics.json"))
    logged = metrics(evaluation)
    assert set(stored["metrics"]) == {f"{t}/{n}" for t in ("segm", "bbox") for n in METRIC_NAMES}
    for key, value in stored["metrics"].items():
        if value >= 0:
            assert logged[f"eval/{key}"] == pytest.approx(value), key
        else:
            assert f"eval/{key}" not in logged, key
    assert [c["mlflow.data.context"] for _, c in datasets(evaluation)] == ["evaluation"]
    assert "eval/segm/AP" not in metrics(best)  # no longer written into the training run

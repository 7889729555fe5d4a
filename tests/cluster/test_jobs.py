"""`tensormask-ray submit` and `tensormask-ray jobs` against a real local Ray head (token auth on,
job server on 127.0.0.1, free ports; see _head.py), run the way a user runs them: as commands, in
a project folder, with the token in the environment or a file."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def _job_id(stderr: str) -> str:
    m = re.search(r"job (raysubmit_\w+) submitted", stderr)
    assert m, stderr
    return m.group(1)


def _token_env(head) -> dict[str, str]:
    return {"RAY_AUTH_TOKEN": head.token}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def neutral(tmp_path_factory) -> Path:
    """A folder to run commands from that holds no `tensormask_ray/` (the project does, on purpose)."""
    return tmp_path_factory.mktemp("cwd")


# ----------------------------------------------------------------------------- the basics
def test_check_job_ships_only_user_files_and_uses_the_installed_package(
    head, cli, project, neutral
):
    r = cli(
        "submit", "check", "--no-ray", "--list-files",
        "--address", head.address, "--working-dir", str(project),
        cwd=neutral, env=_token_env(head),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    assert "SUCCEEDED" in r.stderr
    shipped = set(re.findall(r"\[check\] shipped: (\S+)", r.stdout))
    assert shipped == {"README.md", "configs/note.yaml"}, shipped
    assert re.search(r"tensormask_ray\s+ok .*\(installed\)", r.stdout), r.stdout

    job_id = _job_id(r.stderr)
    logs = cli("jobs", "logs", job_id, "--address", head.address, cwd=neutral, env=_token_env(head))
    assert logs.returncode == 0 and "[check] all checks passed" in logs.stdout
    status = cli(
        "jobs",
        "status",
        job_id,
        "--json",
        "--address",
        head.address,
        cwd=neutral,
        env=_token_env(head),
    )
    view = json.loads(status.stdout)
    assert view["status"] == "SUCCEEDED"
    assert view["metadata"]["tensormask_ray_command"] == "check"
    listing = cli("jobs", "list", "--address", head.address, cwd=neutral, env=_token_env(head))
    assert job_id in listing.stdout and "SUCCEEDED" in listing.stdout


def test_ship_code_runs_this_checkout_with_its_compiled_kernels(head, cli, neutral, tmp_path):
    import tensormask_ray

    built = list(Path(tensormask_ray.__file__).parent.glob("_C*.so"))
    token_file = tmp_path / "token"
    token_file.write_text(head.token)
    r = cli(
        "submit", "--ship-code", "check", "--no-ray",
        "--address", head.address, "--token-file", str(token_file),
        cwd=neutral,
    )  # fmt: skip
    assert re.search(
        r"tensormask_ray\s+ok .*py_modules_files.*\(shipped with the job\)", r.stdout
    ), r.stdout + r.stderr
    if built:  # the compiled extension travels with the code and loads on the cluster
        assert r.returncode == 0, r.stderr
        assert re.search(r"kernels\s+ok", r.stdout), r.stdout
    else:  # nothing to ship: the job says so instead of silently using other kernels
        assert re.search(r"kernels\s+FAIL", r.stdout), r.stdout


def test_a_stopped_job_ends_stopped(head, cli, neutral):
    env = _token_env(head)
    r = cli(
        "submit",
        "check",
        "--no-ray",
        "--hold",
        "300",
        "--no-wait",
        "--address",
        head.address,
        cwd=neutral,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert re.fullmatch(r"raysubmit_\w+", job_id), r.stdout  # --no-wait prints only the id
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        logs = cli("jobs", "logs", job_id, "--address", head.address, cwd=neutral, env=env).stdout
        if "[check] holding" in logs:
            break
        time.sleep(2)
    else:
        pytest.fail(f"the job never started holding:\n{logs}")
    stop = cli("jobs", "stop", job_id, "--address", head.address, cwd=neutral, env=env)
    assert stop.returncode == 0 and f"job {job_id} STOPPED" in stop.stdout, (
        stop.stdout + stop.stderr
    )
    status = cli(
        "jobs", "status", job_id, "--json", "--address", head.address, cwd=neutral, env=env
    )
    assert json.loads(status.stdout)["status"] == "STOPPED"


def test_unknown_job_id_is_a_clear_error(head, cli, neutral):
    r = cli(
        "jobs",
        "status",
        "raysubmit_nope",
        "--address",
        head.address,
        cwd=neutral,
        env=_token_env(head),
    )
    assert r.returncode == 2 and "no such job" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- token auth
def test_without_the_token_submit_and_jobs_fail_clearly(head, cli, neutral):
    for args in (("jobs", "list"), ("submit", "check", "--no-ray")):
        r = cli(*args, "--address", head.address, cwd=neutral)
        assert r.returncode == 2, r.stdout + r.stderr
        assert head.address in r.stderr and "requires its authentication token" in r.stderr, (
            r.stderr
        )
        assert "RAY_AUTH_TOKEN" in r.stderr and "--token-file" in r.stderr
        assert r.seconds < 15
    wrong = cli(
        "jobs", "list", "--address", head.address, cwd=neutral, env={"RAY_AUTH_TOKEN": "f" * 64}
    )
    assert (
        wrong.returncode == 2
        and "rejected the authentication token from RAY_AUTH_TOKEN" in wrong.stderr
    )


def test_token_from_ray_auth_token_path(head, cli, neutral, tmp_path):
    f = tmp_path / "tok"
    f.write_text(head.token + "\n")
    r = cli(
        "jobs", "list", "--address", head.address, cwd=neutral, env={"RAY_AUTH_TOKEN_PATH": str(f)}
    )
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- train and sweep
needs_train = pytest.mark.skipif(
    not _importable("tensormask_ray.train.cli"), reason="tensormask_ray.train.cli not written yet"
)
needs_sweep = pytest.mark.skipif(
    not _importable("tensormask_ray.tune.cli"), reason="tensormask_ray.tune.cli not written yet"
)


@pytest.fixture(scope="module")
def shared(head, cli, tmp_path_factory):
    """'Shared storage' for the local head (absolute paths every process of it sees), with a tiny
    synthetic dataset made there by two `data` jobs, as one would on a real cluster."""
    root = tmp_path_factory.mktemp("shared")
    proj = tmp_path_factory.mktemp("data-proj")
    for args in (
        ("synth", "--out", str(root / "coco"), "--num-images", "4", "--image-size", "96"),
        ("prepare", "--coco-json", str(root / "coco" / "instances.json"),
         "--images-dir", str(root / "coco" / "images"), "--out", str(root / "shards"),
         "--shard-size", "4", "--workers", "1", "--no-progress"),
    ):  # fmt: skip
        r = cli("submit", "data", *args, "--address", head.address, cwd=proj, env=_token_env(head))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "submit: warning" not in r.stderr, r.stderr
    assert (root / "shards" / "manifest.json").is_file()
    return root


def _mlflow_runs(uri: str, since_ms: int):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, max_results=1000) if exps else []
    return [r for r in runs if r.info.start_time >= since_ms]


@needs_train
def test_a_tiny_training_job_succeeds_and_its_run_is_in_mlflow(head, cli, shared, tmp_path):
    proj = tmp_path / "proj"
    (proj / "configs").mkdir(parents=True)
    (proj / "configs" / "tiny.yaml").write_text(
        "preset: cpu-small\n"
        "model: {num_classes: 4}\n"
        f"data: {{train_shards: {shared / 'shards'}, batch_size_per_worker: 1}}\n"
        "solver: {max_iter: 1, warmup_iters: 1, steps: []}\n"
        "train: {num_workers: 1, cpus_per_worker: 0.5, checkpoint_period: 1, log_period: 1}\n"
    )
    uri = f"sqlite:///{shared / 'mlflow.db'}"
    t0 = int(time.time() * 1000)
    r = cli(
        "submit", "train", "--config", "configs/tiny.yaml",
        "--storage-path", str(shared / "runs"), "--run-name", "cluster-train", "--mlflow-uri", uri,
        "--address", head.address,
        cwd=proj, env=_token_env(head), timeout=480,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    # absolute shared paths and an MLflow store: nothing to warn about
    assert "submit: warning" not in r.stderr, r.stderr
    job_id = _job_id(r.stderr)
    logs = cli("jobs", "logs", job_id, "--address", head.address, cwd=proj, env=_token_env(head))
    assert "[train] finished" in logs.stdout, logs.stdout[-3000:]
    runs = [run for run in _mlflow_runs(uri, t0) if run.info.run_name == "cluster-train"]
    assert runs and runs[0].info.status == "FINISHED", runs
    assert (shared / "runs" / "cluster-train").is_dir()


@needs_sweep
def test_a_tiny_sweep_succeeds_and_its_trials_are_in_mlflow(head, cli, shared, tmp_path):
    # A spec in tensormask_ray/tune/spec.py's format; storage and MLflow come from the shared
    # paths and the job's MLFLOW_TRACKING_URI, as on a real cluster.
    proj = tmp_path / "proj"
    (proj / "sweeps").mkdir(parents=True)
    (proj / "sweeps" / "tiny.yaml").write_text(
        "name: cluster-sweep\n"
        "preset: cpu-small\n"
        "config:\n"
        "  model: {num_classes: 4}\n"
        f"  data: {{train_shards: {shared / 'shards'}, batch_size_per_worker: 1}}\n"
        "  solver: {max_iter: 1, warmup_iters: 1, steps: []}\n"
        f"  train: {{num_workers: 1, cpus_per_worker: 0.25, checkpoint_period: 1, storage_path: {shared / 'sweeps'}}}\n"
        "search:\n"
        "  solver.base_lr: [0.01, 0.02]\n"
        "metric: train/loss\n"
        "mode: min\n"
    )
    uri = f"sqlite:///{shared / 'mlflow.db'}"
    t0 = int(time.time() * 1000)
    r = cli(
        "submit", "sweep", "sweeps/tiny.yaml", "--address", head.address,
        cwd=proj, env={**_token_env(head), "MLFLOW_TRACKING_URI": uri}, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    job_id = _job_id(r.stderr)
    logs = cli("jobs", "logs", job_id, "--address", head.address, cwd=proj, env=_token_env(head))
    assert logs.returncode == 0 and logs.stdout.strip()
    finished = [run for run in _mlflow_runs(uri, t0) if run.info.status == "FINISHED"]
    assert len(finished) >= 2, finished


# ----------------------------------------------------------------------------- no leaks (last)
def test_the_token_is_in_no_output_job_record_or_log(head, cli, transcript, neutral):
    """Runs after the jobs above: the token must not appear in anything our CLI printed, in any
    job's entrypoint, runtime env, metadata or message, in any job's logs, or in the head's own
    log files."""
    from ray.job_submission import JobSubmissionClient

    sdk = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
    if not [j for j in sdk.list_jobs() if j.submission_id]:  # run alone: make a job to look at
        r = cli(
            "submit",
            "check",
            "--no-ray",
            "--address",
            head.address,
            cwd=neutral,
            env=_token_env(head),
        )
        assert r.returncode == 0, r.stderr
    assert transcript.outputs
    for text in transcript.outputs:
        assert head.token not in text
    jobs = [j for j in sdk.list_jobs() if j.submission_id]
    for j in jobs:
        record = json.dumps(
            {
                "entrypoint": j.entrypoint,
                "env": j.runtime_env,
                "meta": j.metadata,
                "msg": j.message,
            },
            default=str,
        )
        assert head.token not in record, j.submission_id
        assert head.token not in sdk.get_job_logs(j.submission_id), j.submission_id
    leaked = [
        str(p)
        for p in head.temp_dir.rglob("*")
        if p.is_file()
        and p.suffix in (".log", ".out", ".err", ".txt", ".json")
        and head.token in p.read_text(errors="ignore")
    ]
    assert not leaked, leaked

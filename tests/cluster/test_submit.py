"""`submit` and `jobs` without a cluster: argument splitting, address and token resolution,
what a job ships and carries, and failing fast where nothing listens."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest

from tensormask_ray.cluster import auth, client, code_package, job, working_dir
from tensormask_ray.cluster.cli import split_args
from tensormask_ray.errors import UserError

from ._head import free_ports
from .conftest import make_project

TOKEN = "0123456789abcdef" * 4


# ----------------------------------------------------------------------------- arguments
def test_split_args_takes_submit_options_anywhere_and_keeps_the_rest_in_order():
    own, rest = split_args(
        [
            "--config",
            "c.yaml",
            "--address",
            "http://h:8265",
            "a.b=1",
            "--no-wait",
            "--resume",
            "--env=X=1",
            "--exclude",
            "big/",
        ]
    )
    assert own == ["--address", "http://h:8265", "--no-wait", "--env=X=1", "--exclude", "big/"]
    assert rest == ["--config", "c.yaml", "a.b=1", "--resume"]


def test_split_args_needs_a_value():
    with pytest.raises(UserError, match="--address needs a value"):
        split_args(["--address"])


@pytest.mark.parametrize(
    "given, expected",
    [
        ("http://127.0.0.1:8265", "http://127.0.0.1:8265"),
        ("127.0.0.1:9999/", "http://127.0.0.1:9999"),
        ("https://ray.example.com", "https://ray.example.com:8265"),
        ("http://head", "http://head:8265"),
    ],
)
def test_resolve_address(given, expected):
    assert client.resolve_address(given, environ={}) == expected


def test_resolve_address_from_env_and_errors():
    assert client.resolve_address(None, {"RAY_API_SERVER_ADDRESS": "h:1"}) == "http://h:1"
    assert client.resolve_address(None, {"RAY_ADDRESS": "http://h:2"}) == "http://h:2"
    with pytest.raises(UserError, match="--address"):
        client.resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"})  # a GCS address, not HTTP
    with pytest.raises(UserError, match="Ray Client address"):
        client.resolve_address("ray://h:10001", {})
    with pytest.raises(UserError, match="credentials"):
        client.resolve_address("http://me:pw@h:8265", {})


def test_explicit_address_wins_over_env_in_the_sdk_client(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://elsewhere:1")
    with client._without_address_env():
        import os

        assert "RAY_ADDRESS" not in os.environ
    assert client.resolve_address("http://mine:2", None) == "http://mine:2"


# ----------------------------------------------------------------------------- token
def test_token_sources_in_order(tmp_path):
    f = tmp_path / "tok"
    f.write_text(TOKEN + "\n")
    g = tmp_path / "tok2"
    g.write_text("b" * 64)
    env = {"RAY_AUTH_TOKEN": "a" * 64, "RAY_AUTH_TOKEN_PATH": str(g)}
    assert auth.resolve_token(str(f), "http://h:1", env).source.startswith("--token-file")
    assert auth.resolve_token(None, "http://h:1", env).source == "RAY_AUTH_TOKEN"
    assert auth.resolve_token(None, "http://h:1", {"RAY_AUTH_TOKEN_PATH": str(g)}).headers() == {
        "Authorization": "Bearer " + "b" * 64
    }
    with pytest.raises(UserError, match="cannot read"):
        auth.resolve_token(None, "http://h:1", {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        auth.resolve_token(str(tmp_path / "empty"), "http://h:1", {})


def test_default_token_file_only_for_a_job_server_on_this_machine(tmp_path, monkeypatch):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(TOKEN)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth.resolve_token(None, "http://127.0.0.1:8265", {}).source == "~/.ray/auth_token"
    assert auth.resolve_token(None, "http://localhost:8265", {}) is not None
    assert auth.resolve_token(None, "http://10.1.2.3:8265", {}) is None
    assert auth.resolve_token(None, "https://ray.example.com:443", {}) is None


def test_plain_http_beyond_this_machine_is_warned_about():
    t = auth.Token(TOKEN, "RAY_AUTH_TOKEN")
    assert "plain HTTP" in auth.cleartext_warning("http://10.0.0.5:8265", t)
    assert auth.cleartext_warning("http://127.0.0.1:8265", t) is None  # a tunnel
    assert auth.cleartext_warning("https://ray.example.com:443", t) is None
    assert auth.cleartext_warning("http://10.0.0.5:8265", None) is None


def test_token_never_shows_in_repr_str_or_redacted_text():
    t = auth.Token(TOKEN, "RAY_AUTH_TOKEN")
    assert TOKEN not in repr(t) and TOKEN not in str(t) and TOKEN not in f"{t}"
    assert t.redact(f"x {TOKEN} y") == "x <redacted> y"


# ----------------------------------------------------------------------------- the job
def test_job_ships_user_files_but_never_data_checkpoints_envs_git_or_the_package(tmp_path):
    wd = make_project(tmp_path / "proj")
    spec = job.build_job("check", ["--list-files"], cwd=wd, environ={})
    files = {str(p) for p in working_dir.shipped_files(wd, spec.runtime_env["excludes"])}
    assert files == {"README.md", "configs/note.yaml"}, files
    assert spec.entrypoint == "python -m tensormask_ray.cluster.check --list-files"
    assert spec.runtime_env["working_dir"] == str(wd)
    assert spec.metadata["tensormask_ray_code"] == "installed"


def test_files_the_command_reads_are_rewritten_relative_to_the_working_dir(tmp_path):
    wd = tmp_path / "proj"
    (wd / "configs").mkdir(parents=True)
    (wd / "configs" / "a.yaml").write_text("train: {storage_path: /mnt/shared/runs}\n")
    (wd / "sweep.yaml").write_text("{}\n")
    spec = job.build_job(
        "train",
        ["--config", str(wd / "configs" / "a.yaml"), "--mlflow-uri", "http://mlflow:5000"],
        working_dir=str(wd),
        cwd=tmp_path,
        environ={},
    )
    assert spec.args[:2] == ["--config", "configs/a.yaml"]
    assert spec.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert spec.warnings == []
    sweep = job.build_job(
        "sweep", ["sweep.yaml", "x.y=1"], cwd=wd, environ={"MLFLOW_TRACKING_URI": "http://m:5000"}
    )
    assert sweep.args == ["sweep.yaml", "x.y=1"]
    assert sweep.entrypoint.startswith("python -m tensormask_ray.cli sweep sweep.yaml")
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("{}\n")
    with pytest.raises(UserError, match="outside the working dir"):
        job.build_job(
            "train", ["--config", str(outside)], working_dir=str(wd), cwd=tmp_path, environ={}
        )
    with pytest.raises(UserError, match="file not found"):
        job.build_job("train", ["--config", "nope.yaml"], cwd=wd, environ={})


def test_paths_that_cannot_be_shared_are_warned_about(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "data: {train_shards: data/shards}\ntrain: {storage_path: runs}\n"
    )
    spec = job.build_job(
        "train",
        [
            "--config",
            "c.yaml",
            "--mlflow-uri",
            "sqlite:///mlflow.db",
            "data.val_shards=val",
            "model.weights=w",
        ],
        cwd=tmp_path,
        environ={},
    )
    text = "\n".join(spec.warnings)
    for what in (
        "c.yaml: data.train_shards",
        "c.yaml: train.storage_path",
        "--mlflow-uri",
        "data.val_shards",
        "model.weights",
    ):
        assert what in text, text
    env_store = job.build_job(
        "check", [], cwd=tmp_path, environ={"MLFLOW_TRACKING_URI": "sqlite:///m.db"}
    )
    assert any(
        w.startswith("MLFLOW_TRACKING_URI sqlite:///m.db is a relative") for w in env_store.warnings
    )
    bare = job.build_job("train", [], cwd=tmp_path, environ={})
    assert any("no MLflow store" in w for w in bare.warnings)
    assert any("no storage path" in w for w in bare.warnings)
    ok = job.build_job(
        "train",
        ["--storage-path", "s3://b/runs", "data.train_shards=/mnt/shared/d"],
        cwd=tmp_path,
        environ={"MLFLOW_TRACKING_URI": "sqlite:////mnt/shared/mlflow.db"},
    )
    assert ok.warnings == []


def test_credentials_are_refused_in_job_env_and_mlflow_uri(tmp_path):
    t = auth.Token(TOKEN, "RAY_AUTH_TOKEN")
    for pair in (
        "RAY_AUTH_TOKEN=x",
        "AWS_SECRET_ACCESS_KEY=x",
        "MY_PASSWORD=x",
        f"HARMLESS={TOKEN}",
    ):
        with pytest.raises(UserError, match="credential"):
            job.build_job("check", [], env=[pair], token=t, cwd=tmp_path, environ={})
    spec = job.build_job(
        "check", [], env=["TENSORMASK_OPS=reference"], token=t, cwd=tmp_path, environ={}
    )
    assert spec.runtime_env["env_vars"]["TENSORMASK_OPS"] == "reference"
    with pytest.raises(UserError, match="credentials"):
        job.build_job(
            "train", [], cwd=tmp_path, environ={"MLFLOW_TRACKING_URI": "http://u:p@mlflow:5000"}
        )
    with pytest.raises(UserError, match="token"):
        job.build_job("train", [f"train.run_name={TOKEN}"], token=t, cwd=tmp_path, environ={})


def test_unknown_command_is_refused(tmp_path):
    with pytest.raises(UserError, match="cannot submit 'predict'"):
        job.build_job("predict", [], cwd=tmp_path, environ={})


def test_ship_code_zip_holds_the_package_and_its_compiled_extension(tmp_path):
    import tensormask_ray

    pkg = Path(tensormask_ray.__file__).parent
    zpath, meta = code_package.package_zip(tmp_path)
    names = zipfile.ZipFile(zpath).namelist()
    assert "tensormask_ray/__init__.py" in names and "tensormask_ray/cluster/job.py" in names
    assert not any("__pycache__" in n for n in names)
    built = sorted(p.name for p in pkg.glob("_C*.so"))
    assert sorted(n.split("/")[-1] for n in names if n.endswith(".so")) == built
    assert meta["tensormask_ray_shipped_extension"] == (",".join(built) or "none")
    (tmp_path / "again").mkdir()
    again, _ = code_package.package_zip(tmp_path / "again")
    # byte-identical: Ray's content-addressed upload is skipped when nothing changed
    assert again.read_bytes() == zpath.read_bytes()


# ----------------------------------------------------------------------------- the CLI, no cluster
def test_dry_run_prints_the_job_without_the_token(tmp_path, capsys, monkeypatch):
    from tensormask_ray.cli import main

    wd = make_project(tmp_path / "proj")
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    rc = main(
        [
            "submit",
            "--dry-run",
            "--working-dir",
            str(wd),
            "check",
            "--address",
            "http://127.0.0.1:1",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0
    view = json.loads(out.out)
    assert view["token"] == "from RAY_AUTH_TOKEN"
    assert sorted(view["shipped_files"]) == ["README.md", "configs/note.yaml"]
    assert view["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert TOKEN not in out.out + out.err


@pytest.mark.parametrize("what", ["submit", "jobs"])
def test_nothing_listening_fails_within_seconds_naming_the_address(tmp_path, capsys, what):
    from tensormask_ray.cli import main

    (port,) = free_ports(1)
    address = f"http://127.0.0.1:{port}"
    argv = (
        ["submit", "check", "--address", address]
        if what == "submit"
        else ["jobs", "list", "--address", address]
    )
    t0 = time.monotonic()
    rc = main(argv)
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 2 and elapsed < 10, (rc, elapsed)
    assert f"127.0.0.1:{port}" in err and "nothing listens" in err, err


def test_unroutable_address_times_out_within_the_connect_timeout(capsys):
    from tensormask_ray.cli import main

    t0 = time.monotonic()
    rc = main(["jobs", "list", "--address", "http://10.255.255.1:8265", "--connect-timeout", "2"])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 2 and elapsed < 10, (rc, elapsed)
    assert "10.255.255.1:8265" in err, err


def test_followed_logs_are_redacted_even_when_the_token_is_split_across_chunks():
    import io

    class FakeSdk:
        async def tail_job_logs(self, job_id):
            for chunk in (f"step 1 {TOKEN[:10]}", f"{TOKEN[10:]} leaked\nstep", " 2\r", "end"):
                yield chunk

        def get_job_info(self, job_id):
            return None

        def get_job_status(self, job_id):
            from ray.job_submission import JobStatus

            return JobStatus.SUCCEEDED

    c = object.__new__(client.JobClient)
    c.address, c.token, c._sdk = "http://h:1", auth.Token(TOKEN, "test"), FakeSdk()
    c.redact = c.token.redact
    out = io.StringIO()
    assert c.follow("raysubmit_x", out=out) == "SUCCEEDED"
    assert out.getvalue() == "step 1 <redacted> leaked\nstep 2\rend\n"


# ----------------------------------------------------------------------------- the API, no cluster
def test_a_dry_run_returns_the_job_and_says_its_warnings_without_connecting(tmp_path, monkeypatch):
    from tensormask_ray.cluster.submission import submit_job

    wd = make_project(tmp_path / "proj")
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    said: list[str] = []
    # nothing answers at 10.255.255.1: connecting would fail, not return
    result = submit_job(
        "check",
        ["--no-ray"],
        address="http://10.255.255.1:8265",
        working_dir=str(wd),
        env=["A=1"],
        connect_timeout=0.5,
        dry_run=True,
        say=said.append,
    )
    assert result.submission_id is None and result.status is None and not result.succeeded
    assert result.address == "http://10.255.255.1:8265"
    assert result.entrypoint == "python -m tensormask_ray.cluster.check --no-ray"
    view = result.dry_run
    assert view["entrypoint"] == result.entrypoint and view["token"] == "from RAY_AUTH_TOKEN"
    assert sorted(view["shipped_files"]) == ["README.md", "configs/note.yaml"]
    assert view["runtime_env"]["env_vars"]["A"] == "1"
    assert view["runtime_env"]["working_dir"] == str(wd)
    assert len(said) == 1 and said[0].startswith("tensormask-ray submit: warning: sending")
    assert TOKEN not in json.dumps(view) + repr(result) + "".join(said)


def test_the_api_takes_env_vars_as_a_mapping_or_as_name_value_strings(tmp_path, monkeypatch):
    from tensormask_ray import api

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    wd = make_project(tmp_path / "proj")
    said: list[str] = []
    kwargs = dict(address="http://127.0.0.1:1", working_dir=wd, dry_run=True, say=said.append)
    as_map = api.submit("check", env_vars={"A": "1", "B": "x=y"}, **kwargs)
    as_strings = api.submit("check", env_vars=["A=1", "B=x=y"], **kwargs)
    assert as_map == as_strings
    assert as_map.dry_run["runtime_env"]["env_vars"]["B"] == "x=y"
    assert said == []  # a job server on this machine, no token: nothing to warn about
    with pytest.raises(UserError, match="--env A : not a valid environment variable name"):
        api.submit("check", env_vars={"A ": "1"}, **kwargs)


class FakeJobClient:
    """The JobClient calls `jobs.py` makes, over a scripted sequence of statuses."""

    address = "http://h:1"

    def __init__(self, statuses: list[str], jobs: list | None = None):
        self.statuses, self.jobs, self.stopped = list(statuses), jobs or [], []
        self.redact = auth.Token(TOKEN, "test").redact

    def status(self, job_id):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def stop(self, job_id):
        self.stopped.append(job_id)
        return True

    def wait(self, job_id, timeout):
        return self.status(job_id)

    def list(self):
        return self.jobs


def test_stop_waits_for_a_final_status_and_leaves_an_ended_job_alone():
    from tensormask_ray.cluster.jobs import StopResult, stop_job

    running = FakeJobClient(["RUNNING", "STOPPED"])
    assert stop_job(running, "raysubmit_a", timeout=1) == StopResult(
        "raysubmit_a", "STOPPED", False
    )
    assert running.stopped == ["raysubmit_a"]
    ended = FakeJobClient(["SUCCEEDED"])
    assert stop_job(ended, "raysubmit_b") == StopResult("raysubmit_b", "SUCCEEDED", True)
    assert ended.stopped == []
    stuck = FakeJobClient(["RUNNING"])
    with pytest.raises(UserError, match=r"job raysubmit_c is still RUNNING after 2.5 s"):
        stop_job(stuck, "raysubmit_c", timeout=2.5)
    assert stuck.stopped == ["raysubmit_c"]


def test_listed_jobs_are_newest_first_redacted_and_without_bare_drivers():
    from types import SimpleNamespace

    from tensormask_ray.cluster.jobs import list_jobs

    def record(submission_id, start, message="", status="SUCCEEDED"):
        return SimpleNamespace(
            submission_id=submission_id,
            job_id="01000000",
            status=SimpleNamespace(value=status),
            message=message,
            entrypoint=f"python -m x --secret {TOKEN}",
            start_time=start,
            end_time=None,
            metadata={"tensormask_ray_command": "check"},
        )

    jobs = [record("raysubmit_old", 1000), record(None, 3000), record("raysubmit_new", 2000)]
    listed = list_jobs(FakeJobClient(["RUNNING"], jobs))
    assert listed.address == "http://h:1"
    assert [j.submission_id for j in listed.jobs] == ["raysubmit_new", "raysubmit_old"]
    assert all(j.entrypoint == "python -m x --secret <redacted>" for j in listed.jobs)

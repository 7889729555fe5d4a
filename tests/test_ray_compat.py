"""Each private-Ray accessor in tensormask_ray/ray_compat.py, against the installed Ray: these
fail when an upgrade removes or changes an internal the project relies on."""

from __future__ import annotations

import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from tensormask_ray import ray_compat
from tensormask_ray.ray_compat import RayInternalsError


@pytest.fixture
def other_ray(monkeypatch):
    """The accessors as they would run under a Ray version they were not written for."""
    monkeypatch.setattr(ray_compat, "ray_version", lambda: ("9.1.0", (9, 1)))


def test_the_installed_ray_is_a_tested_one():
    import ray

    text, major_minor = ray_compat.ray_version()
    assert text == ray.__version__ and major_minor in ray_compat.TESTED_RAY


def test_execution_index_of_a_ray_data_context():
    from ray.data import DataContext

    fresh = DataContext()
    assert ray_compat.execution_index(fresh) == 0
    fresh._execution_idx = 3  # what Ray Data sets at the start of each execution
    assert ray_compat.execution_index(fresh) == 3
    assert isinstance(ray_compat.execution_index(), int)  # the current context
    with pytest.raises(
        RayInternalsError, match=r"DataContext\._execution_idx.*no attribute '_execution_idx'"
    ):
        ray_compat.execution_index(SimpleNamespace())


def test_execution_index_counts_the_executions_of_a_dataset(ray_local):
    """What the training epoch relies on: each pass over a dataset is a new execution, and its
    tasks see the execution's number."""
    import ray.data

    ds = ray.data.range(4, override_num_blocks=1).map_batches(
        lambda b: {"epoch": [ray_compat.execution_index()] * len(b["id"])}, batch_size=None
    )
    first, second = ({int(r["epoch"]) for r in ds.iter_rows()} for _ in range(2))
    assert second == {next(iter(first)) + 1} and len(first) == 1


def test_asha_accessors_read_a_real_asha_scheduler():
    from ray.tune.schedulers import ASHAScheduler

    asha = ASHAScheduler(
        time_attr="iteration",
        metric="loss",
        mode="min",
        max_t=8,
        grace_period=2,
        reduction_factor=2,
    )
    assert ray_compat.asha_result_keys(asha) == ("iteration", "loss", -1.0)
    trial = SimpleNamespace(trial_id="t0")
    asha.on_trial_add(None, trial)
    bracket = ray_compat.asha_bracket(asha, "t0")
    assert [m for m, _ in ray_compat.asha_rungs(asha)] == [8, 4, 2]
    bracket.on_result(trial, 2, -0.5)
    assert ray_compat.asha_rungs(asha)[-1] == (2, {"t0": -0.5})
    with pytest.raises(RayInternalsError, match="_trial_info.*no attribute"):
        ray_compat.asha_bracket(SimpleNamespace(), "t0")


def test_trial_filesystem_of_a_real_trial(tmp_path):
    import pyarrow.fs
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="exp")
    trial = Trial("noop", config={}, storage=storage, trial_id="t0", stub=True)
    trial.storage.trial_dir_name = "t0"  # as Tune names it when the trial starts
    fs = ray_compat.trial_filesystem(trial)
    assert isinstance(fs, pyarrow.fs.FileSystem)
    Path(trial.path).mkdir(parents=True)
    Path(trial.path, "result.json").write_text("{}\n")
    with fs.open_input_stream(f"{trial.path}/result.json") as f:
        assert f.readall() == b"{}\n"
    with pytest.raises(RayInternalsError, match="storage_filesystem.*no attribute 'storage'"):
        ray_compat.trial_filesystem(SimpleNamespace())


def test_working_dir_files_is_ray_s_own_traversal(tmp_path):
    (tmp_path / "keep.py").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "note.yaml").write_text("")
    (tmp_path / "sub" / "big.bin").write_text("")
    (tmp_path / ".gitignore").write_text("*.bin\n")
    (tmp_path / "skip.txt").write_text("")
    (tmp_path / ".git").mkdir()  # one of Ray's default excludes
    (tmp_path / ".git" / "HEAD").write_text("")
    files = ray_compat.working_dir_files(tmp_path, ["skip.txt"], include_gitignore=True)
    assert files == [Path(".gitignore"), Path("keep.py"), Path("sub/note.yaml")]
    with_ignored = ray_compat.working_dir_files(tmp_path, ["skip.txt"], include_gitignore=False)
    assert Path("sub/big.bin") in with_ignored


def test_upload_package_file_goes_through_the_real_client_method(tmp_path):
    """The real `JobSubmissionClient._upload_package_if_needed`, over an HTTP layer that answers
    like a job server with no such package yet."""
    from ray.job_submission import JobSubmissionClient

    package = tmp_path / "pkg.zip"
    with zipfile.ZipFile(package, "w") as z:
        z.writestr("tensormask_ray/__init__.py", "")
    requests_seen = []

    def do_request(method, endpoint, **kwargs):
        requests_seen.append((method, endpoint, kwargs.get("data")))
        return SimpleNamespace(status_code=404 if method == "GET" else 200)

    client = JobSubmissionClient.__new__(JobSubmissionClient)  # no server to connect to
    client._do_request = do_request
    uri = ray_compat.upload_package_file(client, str(package))
    assert uri.startswith("gcs://") and uri.endswith(".zip")
    assert [m for m, _, _ in requests_seen] == ["GET", "PUT"]
    assert requests_seen[1][2] == package.read_bytes()
    with pytest.raises(RayInternalsError, match="_upload_package_if_needed.*no attribute"):
        ray_compat.upload_package_file(SimpleNamespace(), str(package))


def test_runtime_env_loggers_name_modules_of_this_ray():
    assert ray_compat.runtime_env_loggers() == ray_compat.RUNTIME_ENV_LOGGERS


def test_every_accessor_refuses_a_ray_it_was_not_written_for(other_ray, tmp_path):
    from ray.data import DataContext
    from ray.tune.schedulers import ASHAScheduler

    asha = ASHAScheduler(time_attr="iteration", metric="loss", mode="min")
    calls = [
        lambda: ray_compat.execution_index(DataContext()),
        lambda: ray_compat.asha_result_keys(asha),
        lambda: ray_compat.asha_bracket(asha, "t0"),
        lambda: ray_compat.asha_rungs(asha),
        lambda: ray_compat.trial_filesystem(SimpleNamespace()),
        lambda: ray_compat.working_dir_files(tmp_path, [], include_gitignore=True),
        lambda: ray_compat.upload_package_file(SimpleNamespace(), "x.zip"),
        ray_compat.runtime_env_loggers,
    ]
    for call in calls:
        with pytest.raises(
            RayInternalsError, match=r"not checked for Ray 9\.1\.0 .*written against Ray 2\.60\.x"
        ):
            call()


def test_a_changed_internal_under_the_job_client_is_not_reported_as_the_server_s_refusal(other_ray):
    """JobClient turns RuntimeErrors into "the job server refused the request": a changed
    internal must come through as itself."""
    from tensormask_ray.cluster.client import JobClient

    client = JobClient.__new__(JobClient)
    client.address, client.token, client.redact, client._sdk = (
        "http://h:8265",
        None,
        str,
        SimpleNamespace(),
    )
    with pytest.raises(RayInternalsError, match="_upload_package_if_needed"):
        client.upload_package_file("x.zip")

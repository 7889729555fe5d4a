"""Sweep specs: every shipped spec is valid; a bad one fails before Ray starts, naming the key."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tensormask_ray.tune.spec import SpecError, base_config, load_spec, param_space, parse_spec

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "sweeps").rglob("*.yaml"))  # the paper-scale specs and sweeps/cpu/


def _spec(**changes):
    raw = {"name": "t", "preset": "cpu-small", "search": {"solver.base_lr": [0.01, 0.02]}}
    raw.update(changes)
    return raw


def test_the_shipped_specs_are_there_and_valid():
    assert {str(p.relative_to(ROOT / "sweeps")) for p in SHIPPED} >= {
        *(f"{name}.yaml" for name in ("heads", "bipyramid", "loss_weights", "lr")),
        *(f"cpu/{name}.yaml" for name in ("heads", "bipyramid", "loss_weights", "lr", "smoke")),
    }
    for path in SHIPPED:
        spec = load_spec(path)
        cfg = base_config(spec)  # applies every listed value of the space to the config
        assert cfg.solver.max_iter > 0
        assert set(param_space(spec)) == set(spec.search)


@pytest.mark.parametrize(
    "raw, named",
    [
        (_spec(serach={}), "'serach'"),
        (_spec(search={"solver.base_rate": [0.1]}), "'search.solver.base_rate'"),
        (_spec(search={"solver.base_lr": []}), "'search.solver.base_lr' is an empty space"),
        (_spec(search={}), "'search'"),
        (_spec(search={"solver.base_lr": {"uniform": [0.1, 0.1]}}), "range [0.1, 0.1] is empty"),
        (_spec(search={"solver.base_lr": {"loguniform": [0, 1]}}), "lo > 0"),
        (_spec(search={"solver.base_lr": {"normal": [0, 1]}}), "'search.solver.base_lr' must be"),
        (_spec(scheduler={"type": "asha", "grace": 3}), "'scheduler.grace'"),
        (_spec(scheduler={"type": "hyperband"}), "'scheduler.type'"),
        (_spec(mode="maximum"), "'mode'"),
        (
            _spec(search_alg="grid", search={"solver.base_lr": {"uniform": [0.1, 0.2]}}),
            "'search.solver.base_lr' is uniform",
        ),
        (
            _spec(search={"solver.base_lr": {"uniform": ["a", 1]}}),
            "'search.solver.base_lr': uniform takes [lo, hi]",
        ),
        (
            _spec(search={"solver.max_iter": {"randint": [1.5, 8]}}),
            "'search.solver.max_iter': randint takes integer",
        ),
        (_spec(search=["solver.base_lr"]), "'search'"),
        (_spec(scheduler={"grace_period": "4"}), "'scheduler.grace_period' must be an integer"),
        (
            _spec(scheduler={"reduction_factor": 1}),
            "'scheduler.reduction_factor' must be a number > 1",
        ),
        (_spec(scheduler={"grace_period": 8, "max_t": 4}), "'scheduler.max_t'"),
        (_spec(scheduler="asha"), "'scheduler' must be a mapping"),
        (_spec(resources={"workers": 0.5}), "'resources.workers' must be an integer"),
        (_spec(resources={"cpus_per_worker": "one"}), "'resources.cpus_per_worker'"),
        (_spec(resources={"gpu": 1}), "'resources.gpu'"),
        (_spec(num_samples=0), "'num_samples'"),
        (_spec(max_failures=-1), "'max_failures'"),
        (_spec(max_concurrent_trials="2"), "'max_concurrent_trials'"),
        (_spec(preset=3), "'preset'"),
        (_spec(config=["solver.base_lr=1"]), "'config' must be a mapping"),
        (_spec(name="../up"), "'name'"),
        (_spec(search_alg="bayes"), "'search_alg'"),
    ],
)
def test_bad_specs_fail_naming_the_key(raw, named):
    with pytest.raises(SpecError) as e:
        parse_spec(raw, "bad.yaml")
    assert named in str(e.value) and "bad.yaml" in str(e.value)


def test_a_value_the_config_rejects_names_the_key_and_value():
    spec = parse_spec(
        _spec(search={"model.mask_head": ["bipyramid", "upscale_sideways"]}), "bad.yaml"
    )
    with pytest.raises(SpecError, match=r"'search.model.mask_head' value 'upscale_sideways'"):
        base_config(spec)
    spec = parse_spec(_spec(config={"solver": {"max_itr": 5}}), "bad.yaml")
    with pytest.raises(SpecError, match="solver.max_itr"):
        base_config(spec)


def test_the_cli_fails_fast_without_starting_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_spec(search={"model.window_size": [9, 11]})))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "tensormask_ray.cli", "sweep", str(bad)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "'search.model.window_size' is not a config key" in r.stderr
    assert "Started a local Ray" not in r.stdout + r.stderr
    assert time.time() - t0 < 60
    assert not (tmp_path / "runs").exists()  # nothing written


def test_optuna_is_named_when_it_is_not_installed():
    import importlib.util

    raw = _spec(search_alg="optuna", search={"solver.base_lr": {"loguniform": [1e-4, 1e-2]}})
    if importlib.util.find_spec("optuna") is not None:
        assert parse_spec(raw, "ok.yaml").search_alg == "optuna"
        return
    with pytest.raises(SpecError, match="'search_alg' optuna needs the optuna package"):
        parse_spec(raw, "bad.yaml")


def test_values_that_clash_together_fail_naming_the_trial():
    # Each value is valid alone (the default bipyramid head ignores lambda); an upscaling head
    # with lambda 2 cannot split 15x15 windows: the combination is named before Ray starts.
    spec = parse_spec(_spec(config={"model": {"window_sizes": [15]}},
                            search={"model.mask_head": {"grid": ["bipyramid", "upscale_aligned"]},
                                    "model.upscale_factor": [3.0, 2.0]}), "bad.yaml")  # fmt: skip
    with pytest.raises(
        SpecError,
        match=r"search.model.mask_head='upscale_aligned', search.model.upscale_factor=2.0",
    ):
        base_config(spec)


def test_resumable_asha_rebuilds_its_rungs_from_reported_results(tmp_path):
    """Tune restores a sweep's trials but not its scheduler: the rungs come back from each
    restored trial's result.json, so a resumed sweep still stops a weak trial at the first rung."""
    import json
    from types import SimpleNamespace

    import pyarrow.fs
    from ray.tune.schedulers import TrialScheduler

    from tensormask_ray.tune.scheduler import ResumableASHA

    def trial(trial_id, losses):
        folder = tmp_path / trial_id
        folder.mkdir()
        lines = [
            json.dumps({"iteration": 4 * (i + 1), "train/loss": v}) for i, v in enumerate(losses)
        ]
        (folder / "result.json").write_text("\n".join(lines) + ("\n" if lines else ""))
        storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem())
        return SimpleNamespace(
            trial_id=trial_id, local_path=str(folder), path=str(folder), storage=storage
        )

    def asha():
        return ResumableASHA(time_attr="iteration", metric="train/loss", mode="min", max_t=12,
                             grace_period=4, reduction_factor=2)  # fmt: skip

    scheduler = asha()
    finished, new = trial("a", [1.0, 0.8, 0.7]), trial("b", [])
    scheduler.on_trial_add(None, finished)  # restored: its results are replayed
    scheduler.on_trial_add(None, new)
    assert {m: r for m, r in scheduler.rungs()} == {8: {"a": -0.8}, 4: {"a": -1.0}}
    assert (
        scheduler.on_trial_result(None, new, {"iteration": 4, "train/loss": 5.0})
        == TrialScheduler.STOP
    )
    # a plain ASHA, as Tuner.restore brings it back, forgets: the weak trial passes the rung
    from ray.tune.schedulers import ASHAScheduler

    plain = ASHAScheduler(
        time_attr="iteration",
        metric="train/loss",
        mode="min",
        max_t=12,
        grace_period=4,
        reduction_factor=2,
    )
    plain.on_trial_add(None, finished)
    plain.on_trial_add(None, new)
    assert (
        plain.on_trial_result(None, new, {"iteration": 4, "train/loss": 5.0})
        == TrialScheduler.CONTINUE
    )


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the sweep gets as far as starting (or joining) Ray."""
    import tensormask_ray.tune.sweep as sweep

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(sweep, "ensure_ray", refuse)
    return sweep


def test_run_sweep_checks_data_and_metric_before_ray(tmp_path, synth_shards, no_ray):
    from tensormask_ray.errors import UserError

    common = {
        "storage_path": str(tmp_path / "runs"),
        "mlflow_uri": f"sqlite:///{tmp_path / 'm.db'}",
    }
    spec = parse_spec(_spec(config={"model": {"num_classes": 4}}), "s.yaml")  # metric val/segm/AP
    with pytest.raises(UserError, match="'metric' val/segm/AP needs validation data"):
        no_ray.run_sweep(spec, [f"data.train_shards={synth_shards}"], **common)
    spec = parse_spec(_spec(metric="train/loss"), "s.yaml")
    with pytest.raises(UserError, match="/nowhere/manifest.json: no such file"):
        no_ray.run_sweep(spec, ["data.train_shards=/nowhere"], **common)
    with pytest.raises(SpecError, match="solver.base_lr"):
        no_ray.run_sweep(spec, ["solver.base_lr=-1", f"data.train_shards={synth_shards}"], **common)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()  # nothing written


def test_resume_of_an_unknown_sweep_names_it(tmp_path, no_ray):
    from tensormask_ray.errors import UserError

    with pytest.raises(UserError, match="--resume: no sweep 'nope'"):
        no_ray.resume_sweep("nope", storage_path=str(tmp_path))


# ----------------------------------------------------------------------------- MLflow's view
def test_trials_are_named_by_their_swept_values():
    from tensormask_ray.tune.trainable import trial_display_name

    params = {"model.upscale_factor": 5.0, "model.mask_head": "upscale_aligned"}
    order = ["model.mask_head", "model.upscale_factor"]
    assert trial_display_name(params, "6df1b_00001", 1, order) == "head=upscale_aligned lam=5"
    assert trial_display_name(params, "6df1b_00003", 2, order) == "head=upscale_aligned lam=5 #3"
    variant = {
        "solver.base_lr": 1e-3,
        "variant": {"model.mask_head": "bipyramid", "model.window_sizes": [15, 11]},
    }
    assert trial_display_name(variant, "x_00000") == "lr=0.001 head=bipyramid windows=[15,11]"
    # two keys ending alike are spelled out in full
    clash = {"loss.box_weight": 1.0, "model.box_weight": 2.0}
    assert trial_display_name(clash, "x_00000") == "loss.box_weight=1 model.box_weight=2"


def test_the_parent_run_shows_the_spec_as_run_and_only_the_fixed_config(tmp_path):
    from tensormask_ray.tune.sweep import effective_spec_yaml, fixed_params

    search = {
        "solver.base_lr": [0.01, 0.02],
        "variant": {
            "grid": [{"model.mask_head": "upscale_aligned"}, {"model.window_sizes": [15, 11]}]
        },
    }
    spec = parse_spec(
        _spec(search=search, metric="train/loss", mode="min", config={"solver": {"max_iter": 24}}),
        "s.yaml",
    )
    shown = yaml.safe_load(
        effective_spec_yaml(spec, ["solver.max_iter=12", "data.train_shards=/d"])
    )
    assert (
        shown["config"]["solver"]["max_iter"] == 12
        and shown["config"]["data"]["train_shards"] == "/d"
    )
    assert shown["search"] == search and "source" not in shown
    params = fixed_params(spec, base_config(spec, ["solver.max_iter=12"]), str(tmp_path / "t"))
    for searched in ("solver.base_lr", "model.mask_head", "model.window_sizes", "train.run_name"):
        assert searched not in params
    assert params["solver.max_iter"] == 12 and params["train.checkpoint_metric"] == "train/loss"
    assert params["train.storage_path"] == f"{tmp_path / 't'}/trials"

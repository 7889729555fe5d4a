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
SHIPPED = sorted((ROOT / "sweeps").glob("*.yaml"))


def _spec(**changes):
    raw = {"name": "t", "preset": "cpu-small", "search": {"solver.base_lr": [0.01, 0.02]}}
    raw.update(changes)
    return raw


def test_the_shipped_specs_are_there_and_valid():
    assert {p.stem for p in SHIPPED} >= {"heads", "bipyramid", "loss_weights", "lr", "smoke"}
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
        (_spec(search_alg="grid", search={"solver.base_lr": {"uniform": [0.1, 0.2]}}), "'search.solver.base_lr' is uniform"),
    ],
)
def test_bad_specs_fail_naming_the_key(raw, named):
    with pytest.raises(SpecError) as e:
        parse_spec(raw, "bad.yaml")
    assert named in str(e.value) and "bad.yaml" in str(e.value)


def test_a_value_the_config_rejects_names_the_key_and_value():
    spec = parse_spec(_spec(search={"model.mask_head": ["bipyramid", "upscale_sideways"]}), "bad.yaml")
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

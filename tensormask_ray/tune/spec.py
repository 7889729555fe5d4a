"""Sweep specs: a YAML file naming the base config, the search space, the metric, the scheduler,
the search algorithm and the resources of a Ray Tune sweep. Everything is checked here, before
Ray starts: an unknown key, a config key that does not exist, an empty or inverted range, or a
value the config rejects is an error naming the key.

    name: heads                       # the sweep's name: its folder and MLflow parent run
    preset: cpu-small                 # base config: preset(s), a YAML file, and/or inline keys
    base: configs/my.yaml
    config: {model: {num_classes: 4}, solver: {max_iter: 200}}
    search:                           # dotted config key -> space
      model.mask_head: [upscale_natural, upscale_aligned]      # a list = choice
      model.upscale_factor: {grid: [1.5, 3.0, 5.0]}            # every value, in every sample
      solver.base_lr: {loguniform: [1.0e-4, 1.0e-2]}           # also uniform, randint [lo, hi)
      variant:                                                 # several keys that go together
        grid: [{model.mask_head: upscale_aligned}, {model.mask_head: bipyramid, model.window_sizes: [15, 11]}]
    metric: val/segm/AP               # default; mode: max (default) or min
    scheduler: {type: asha, grace_period: 50, reduction_factor: 2}   # in iterations; or fifo
    search_alg: random                # random (default), grid, optuna (if installed)
    num_samples: 1
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}
    max_concurrent_trials: 1
    max_failures: 1                   # retries of a failed trial
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import (
    PATH_KEYS,
    Config,
    ConfigError,
    apply_overrides,
    known_keys,
    load_config,
    parse_override,
)
from ..errors import UserError
from ..finite import is_finite_number

SPACE_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
# a search entry whose values are mappings of config overrides, applied together
VARIANT = "variant"


class SpecError(UserError):
    """A sweep spec that cannot run; the message names the spec file and the key."""


@dataclass
class SchedulerSpec:
    type: str = "asha"  # asha | fifo
    grace_period: int = 1  # iterations a trial runs before ASHA may stop it
    reduction_factor: float = 2.0
    max_t: int | None = None  # default: the base config's solver.max_iter


@dataclass
class ResourcesSpec:
    workers: int | None = None  # Ray Train workers per trial (default: train.num_workers)
    cpus_per_worker: float | None = None  # default: train.cpus_per_worker
    gpus_per_worker: float = 0.0


@dataclass
class SweepSpec:
    name: str
    search: dict[str, Any]
    preset: str | None = None
    base: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metric: str = "val/segm/AP"
    mode: str = "max"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    search_alg: str = "random"
    num_samples: int = 1
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    max_concurrent_trials: int = 1
    max_failures: int = 0
    seed: int | None = None
    source: str = "<inline>"  # where the spec came from, for messages

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"source"}


def _section(raw: Any, cls, where: str, source: str):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise SpecError(f"sweep spec {source}: '{where}' must be a mapping")
    unknown = set(raw) - _fields(cls)
    if unknown:
        raise SpecError(
            f"sweep spec {source}: unknown key '{where}.{sorted(unknown)[0]}' (known: {sorted(_fields(cls))})"
        )
    return cls(**raw)


def parse_spec(raw: Any, source: str = "<inline>") -> SweepSpec:
    """A mapping (as read from YAML) -> SweepSpec, with every check that needs no Ray."""
    if not isinstance(raw, dict):
        raise SpecError(f"sweep spec {source}: must be a mapping")
    unknown = set(raw) - _fields(SweepSpec)
    if unknown:
        raise SpecError(
            f"sweep spec {source}: unknown key '{sorted(unknown)[0]}' (known: {sorted(_fields(SweepSpec))})"
        )
    for key in ("name", "search"):
        if key not in raw:
            raise SpecError(f"sweep spec {source}: '{key}' is required")
    data = dict(raw)
    data["scheduler"] = _section(raw.get("scheduler"), SchedulerSpec, "scheduler", source)
    data["resources"] = _section(raw.get("resources"), ResourcesSpec, "resources", source)
    data["config"] = raw.get("config") or {}
    spec = SweepSpec(**data, source=source)
    _check(spec)
    return spec


def load_spec(path: str | Path) -> SweepSpec:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"sweep spec not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"sweep spec {p} is not valid YAML: {e}") from e
    spec = parse_spec(raw, str(p))
    if spec.base and not Path(spec.base).is_absolute():
        spec.base = (
            str((p.parent / spec.base).resolve()) if (p.parent / spec.base).is_file() else spec.base
        )
    return spec


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_types(spec: SweepSpec) -> None:
    """Each field's type, named: a string where a number belongs fails here, not inside Ray."""
    src = spec.source
    checks = [
        ("preset", spec.preset, lambda v: v is None or (isinstance(v, str) and v), "a preset name such as cpu-small"),
        ("base", spec.base, lambda v: v is None or (isinstance(v, str) and v), "the path of a config YAML file"),
        ("config", spec.config, lambda v: isinstance(v, dict), "a mapping of config sections"),
        ("metric", spec.metric, lambda v: isinstance(v, str) and v, "a metric name such as val/segm/AP"),
        ("search_alg", spec.search_alg, lambda v: isinstance(v, str), "random, grid or optuna"),
        ("num_samples", spec.num_samples, lambda v: _integer(v) and v >= 1, "an integer >= 1"),
        ("max_concurrent_trials", spec.max_concurrent_trials, lambda v: _integer(v) and v >= 1, "an integer >= 1"),
        ("max_failures", spec.max_failures, lambda v: _integer(v) and v >= 0, "an integer >= 0"),
        ("seed", spec.seed, lambda v: v is None or _integer(v), "an integer"),
        ("scheduler.type", spec.scheduler.type, lambda v: v in ("asha", "fifo"), "asha or fifo"),
        ("scheduler.grace_period", spec.scheduler.grace_period, lambda v: _integer(v) and v >= 1, "an integer >= 1 (iterations)"),
        ("scheduler.reduction_factor", spec.scheduler.reduction_factor, lambda v: is_finite_number(v) and v > 1, "a number > 1"),
        ("scheduler.max_t", spec.scheduler.max_t, lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1 (iterations)"),
        ("resources.workers", spec.resources.workers, lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1"),
        ("resources.cpus_per_worker", spec.resources.cpus_per_worker, lambda v: v is None or (is_finite_number(v) and v > 0), "a number > 0"),
        ("resources.gpus_per_worker", spec.resources.gpus_per_worker, lambda v: is_finite_number(v) and v >= 0, "a number >= 0"),
    ]  # fmt: skip
    for key, value, ok, expected in checks:
        if not ok(value):
            raise SpecError(f"sweep spec {src}: '{key}' must be {expected}, got {value!r}")
    if spec.scheduler.max_t is not None and spec.scheduler.max_t < spec.scheduler.grace_period:
        raise SpecError(
            f"sweep spec {src}: 'scheduler.max_t' ({spec.scheduler.max_t}) is below 'scheduler.grace_period'"
        )


def validate_spec(spec: SweepSpec) -> None:
    """Every check that needs neither Ray nor the data (parse_spec runs it; run it again after
    changing a spec, e.g. its name)."""
    _check(spec)


def pin_searched_keys(spec: SweepSpec, overrides: list[str]) -> SweepSpec:
    """An override of a searched key pins it: `model.upscale_factor=5` runs the spec's other
    dimensions at lambda 5 only."""
    pinned = [k for k, _ in map(parse_override, overrides) if k in spec.search]
    if not pinned:
        return spec
    search = {k: v for k, v in spec.search.items() if k not in pinned}
    if not search:
        raise SpecError(
            f"sweep spec {spec.source}: the overrides pin every searched key ({', '.join(pinned)}): nothing left to sweep"
        )
    print(f"[sweep] pinned by the command line: {', '.join(pinned)}", flush=True)
    return dataclasses.replace(spec, search=search)


def _check(spec: SweepSpec) -> None:
    src = spec.source
    if (
        not isinstance(spec.name, str)
        or not spec.name
        or "/" in spec.name
        or spec.name.startswith(".")
    ):
        raise SpecError(f"sweep spec {src}: 'name' must be a plain folder name, got {spec.name!r}")
    _check_types(spec)
    if spec.mode not in ("max", "min"):
        raise SpecError(f"sweep spec {src}: 'mode' must be max or min, got {spec.mode!r}")
    if spec.search_alg not in ("random", "grid", "optuna"):
        raise SpecError(
            f"sweep spec {src}: 'search_alg' must be random, grid or optuna, got {spec.search_alg!r}"
        )
    if spec.search_alg == "optuna" and importlib.util.find_spec("optuna") is None:
        raise SpecError(f"sweep spec {src}: 'search_alg' optuna needs the optuna package (`pip install optuna`), "
                        "which is not installed; use random or grid")  # fmt: skip
    if not isinstance(spec.search, dict) or not spec.search:
        raise SpecError(
            f"sweep spec {src}: 'search' must map config keys to spaces, and not be empty"
        )
    keys = set(known_keys())
    for key, space in spec.search.items():
        if key != VARIANT and key not in keys:
            raise SpecError(f"sweep spec {src}: 'search.{key}' is not a config key")
        kind, values = space_of(key, space, src)
        if key == VARIANT:
            if kind not in ("choice", "grid") or not all(isinstance(v, dict) and v for v in values):
                raise SpecError(
                    f"sweep spec {src}: 'search.{VARIANT}' must list mappings of config keys to values"
                )
            for v in values:
                bad = [k for k in v if k not in keys]
                if bad:
                    raise SpecError(
                        f"sweep spec {src}: 'search.{VARIANT}' names '{bad[0]}', which is not a config key"
                    )
        if spec.search_alg == "grid" and kind not in ("choice", "grid"):
            raise SpecError(
                f"sweep spec {src}: 'search.{key}' is {kind}, which search_alg grid cannot enumerate"
            )
        if spec.search_alg == "optuna" and kind == "grid":
            raise SpecError(
                f"sweep spec {src}: 'search.{key}': grid spaces need search_alg random or grid"
            )


def space_of(key: str, space: Any, source: str = "<inline>") -> tuple[str, list[Any]]:
    """(kind, values) of one search entry: the values for choice/grid, [lo, hi] for ranges."""
    where = f"sweep spec {source}: 'search.{key}'"
    if isinstance(space, list):
        kind, values = "choice", space
    elif isinstance(space, dict) and len(space) == 1 and next(iter(space)) in SPACE_KINDS:
        kind, values = next(iter(space.items()))
    else:
        raise SpecError(
            f"{where} must be a list of values or one of {{{', '.join(SPACE_KINDS)}: ...}}, got {space!r}"
        )
    if not isinstance(values, list) or not values:
        raise SpecError(f"{where} is an empty space")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise SpecError(f"{where}: {kind} takes [lo, hi], got {values!r}")
        lo, hi = values
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise SpecError(f"{where}: {kind} range [{lo}, {hi}] is empty")
        if kind == "loguniform" and lo <= 0:
            raise SpecError(f"{where}: loguniform needs lo > 0, got {lo}")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            raise SpecError(f"{where}: randint takes integer bounds, got {values!r}")
    return kind, values


def base_config(spec: SweepSpec, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """The config every trial starts from: preset -> base file -> spec.config -> CLI overrides,
    with the paths made absolute. Each value of the search space is applied to it once, so a
    value the config rejects fails here, naming the key."""
    from ..config import flatten
    from ..train import storage

    try:
        cfg = load_config(spec.base, None, spec.preset)
        cfg = apply_overrides(cfg, flatten(spec.config))
        if overrides:
            items = (
                overrides
                if isinstance(overrides, dict)
                else dict(parse_override(o) for o in overrides)
            )
            cfg = apply_overrides(cfg, items)
        cfg = cfg.validate()
    except ConfigError as e:
        raise SpecError(f"sweep spec {spec.source}: {e}") from e
    flat = cfg.flat()
    cfg = apply_overrides(cfg, {k: storage.absolute(flat[k]) for k in PATH_KEYS if flat.get(k)})
    for key, space in spec.search.items():
        kind, values = space_of(key, space, spec.source)
        probes = values if kind in ("choice", "grid") else [values[0]]
        for value in probes:
            try:
                apply_overrides(cfg, trial_overrides({key: value})).validate()
            except ConfigError as e:
                raise SpecError(
                    f"sweep spec {spec.source}: 'search.{key}' value {value!r}: {e}"
                ) from e
    _check_combinations(spec, cfg)
    return cfg


MAX_PROBED_COMBINATIONS = 256


def _check_combinations(spec: SweepSpec, cfg: Config) -> None:
    """Values that pass alone can clash together (a natural head at lambda 5 needs windows that
    5 divides): when the listed values make at most MAX_PROBED_COMBINATIONS trials, each
    combination (ranges at their low end) is applied to the config."""
    keys, choices = [], []
    for key, space in spec.search.items():
        kind, values = space_of(key, space, spec.source)
        keys.append(key)
        choices.append(values if kind in ("choice", "grid") else [values[0]])
    if math.prod(len(c) for c in choices) > MAX_PROBED_COMBINATIONS:
        return
    for combo in itertools.product(*choices):
        params = dict(zip(keys, combo))
        try:
            apply_overrides(cfg, trial_overrides(params)).validate()
        except ConfigError as e:
            named = ", ".join(f"search.{k}={v!r}" for k, v in params.items())
            raise SpecError(
                f"sweep spec {spec.source}: the trial {named} is not a valid config: {e}"
            ) from e


def trial_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled values as config overrides (a variant expands into its keys)."""
    out = {k: v for k, v in params.items() if k != VARIANT}
    out.update(params.get(VARIANT) or {})
    return out


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The Tune search space: dotted config key -> a Tune domain (or grid_search)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, space in spec.search.items():
        kind, values = space_of(key, space, spec.source)
        if kind == "grid" or (kind == "choice" and spec.search_alg == "grid"):
            out[key] = tune.grid_search(values)
        elif kind == "choice":
            out[key] = tune.choice(values)
        elif kind == "uniform":
            out[key] = tune.uniform(*values)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*values)
        else:
            out[key] = tune.randint(*values)
    return out

"""Typed configuration: one home for every default.

A `Config` is a tree of dataclasses. It is built from the defaults below, then (in this order) a
named preset (tensormask_ray/configs/NAME.yaml), a YAML file and dotted command-line overrides
such as ``model.mask_head=bipyramid model.window_sizes=[15,11]``. An unknown key or a value of
the wrong type is a `ConfigError` that names the key. Nothing here is global or mutable at import time.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the key."""


MaskHead = Literal[
    "simple_natural", "simple_aligned", "upscale_natural", "upscale_aligned", "bipyramid"
]
# "paper": the geometry this project derives from the paper (window centres at grid-cell centres,
# swap_align2nat reading integer rows, edge-replicating interpolation of the window grid).
# "detectron2": Detectron2's TensorMask exactly (docs/detectron2.md): window centres at stride * x,
# windows = its anchors, its SwapAlign2Nat (half-pixel sampling, pad_value past the window grid's
# rim), its candidate order, NMS on unclipped boxes, and its training-side rules.
Geometry = Literal["paper", "detectron2"]


@dataclass
class BackboneConfig:
    depth: int = 50  # torchvision ResNet depth: 18, 34, 50 or 101
    # Local torchvision ResNet checkpoint (a state_dict .pth). None: random init. Never downloaded.
    weights: str | None = None
    # 0: train everything; 1: freeze the stem; 2: stem + res2 (Detectron2's default); up to 5.
    freeze_at: int = 2
    # "FrozenBN" (the paper's, with pretrained weights) or "GN" (group norm: from random init).
    norm: Literal["FrozenBN", "GN"] = "FrozenBN"
    # The MSRA ResNet of Detectron2 (RESNETS.STRIDE_IN_1X1): the stride of res3-res5 in the first
    # 1x1 conv of the block, not in the 3x3 as torchvision's. Same shapes, other network: weights
    # of one are garbage in the other (ResNet-50/101 only).
    stride_in_1x1: bool = False


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_classes: int = 80
    fpn_channels: int = 256  # C of the FPN levels
    min_level: int = 2  # P2 ... P7 are k = 0 ... 5 (paper §4.2)
    max_level: int = 7
    fpn_fuse: Literal["avg", "sum"] = "avg"  # the paper averages top-down and lateral (§4.2)
    mask_head: MaskHead = "bipyramid"
    window_sizes: list[int] = field(default_factory=lambda: [15])  # V = U per window size (Tab. 2d)
    upscale_factor: float = 1.0  # lambda of the upscale_* heads (Tab. 2a-b): 1.5, 3 or 5
    upscale_mode: Literal["bilinear", "nearest"] = "bilinear"
    cls_channels: int = 256  # class tower: 4 x (3x3 conv, 256, ReLU)
    box_channels: int = 128  # box tower: 4 x (3x3 conv, 128, ReLU)
    mask_channels: int = 128  # mask tower: 4 x (3x3 conv, 128, ReLU)
    tower_depth: int = 4
    pad_value: float = -6.0  # logit for reads outside the image: the tensor ops have no default
    prior_prob: float = 0.01  # class-logit bias init, as RetinaNet
    geometry: Geometry = "paper"
    # How training computes the mask loss: "sparse" runs the mask head (the bipyramid's fusion, the
    # conv+reshape) and the window op only on crops around the positive windows, so the cost follows
    # the number of positives; "dense" computes every window of every level, then picks the
    # positives. Equal losses and gradients (tests/modeling/test_sparse_training.py); sparse is
    # faster and lighter at paper scale, about even on the CPU presets (benchmarks/train_step.py).
    mask_training: Literal["sparse", "dense"] = "sparse"
    # Box-delta weights (wx, wy, ww, wh): targets are (wx*dx, wy*dy, ww*dw, wh*dh); Detectron2's
    # TensorMask uses (1.5, 1.5, 0.75, 0.75) (BBOX_REG_WEIGHTS).
    box_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    # A checkpoint of this project (folder or state.pt, e.g. one `tensormask-ray convert` wrote)
    # whose model weights initialise the model: fine-tuning. Optimiser and iteration start afresh.
    weights: str | None = None


@dataclass
class AssignConfig:
    """The mask-driven label assignment of §4.2."""

    # (i) containment: the mask's longer side must be >= scale_ratio x the window's longer side.
    scale_ratio: float = 0.5
    # (ii) centrality: the mask-box centre within this many units of the window centre (l2).
    center_radius: float = 1.0
    # (iii) uniqueness: windows that two masks both satisfy are negatives.
    uniqueness: bool = True
    # Masks smaller than the smallest assignable size go to windows of the smallest size.
    small_object_fallback: bool = True


@dataclass
class LossConfig:
    cls_weight: float = 1.0
    box_weight: float = 1.0
    mask_weight: float = 2.0  # Detectron2's TensorMask default
    focal_gamma: float = 3.0  # FL* (§4.2)
    focal_alpha: float = 0.3
    mask_fg_weight: float = 1.5  # foreground-pixel weight of the mask BCE (§4.2)


@dataclass
class InferenceConfig:
    score_thresh: float = 0.05
    topk_candidates: int = 6000  # over all windows and classes, before NMS
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    mask_threshold: float = 0.5


@dataclass
class InputConfig:
    min_size_train: list[int] = field(default_factory=lambda: [640, 800])  # shorter side ~ U[a, b]
    max_size_train: int = 1333
    flip_prob: float = 0.5
    min_size_test: int = 800
    max_size_test: int = 1333
    size_divisibility: int = 32
    # What the network sees: "RGB" = channels R, G, B with values pixel / 255 (torchvision's
    # convention); "BGR255" = channels B, G, R with values 0-255 (Detectron2's, and the MSRA /
    # Caffe2 models'). pixel_mean / pixel_std are in the format's channel order and range.
    format: Literal["RGB", "BGR255"] = "RGB"
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    pixel_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class DataConfig:
    train_shards: str = ""  # folder of Parquet shards written by `tensormask-ray data prepare`
    val_shards: str = ""
    # COCO json of the validation split (for pycocotools); from the manifest if empty
    val_json: str = ""
    batch_size_per_worker: int = 2
    seed: int = 0
    max_val_images: int = 0  # 0: all


@dataclass
class SolverConfig:
    # "sgd" is the paper's (momentum, weight decay). "adamw" converges much faster for short
    # from-scratch runs with random init (CPU demos, overfitting checks); use base_lr ~1e-3 with it.
    optimizer: Literal["sgd", "adamw"] = "sgd"
    base_lr: float = 0.02  # at a global batch of reference_batch_size, scaled linearly
    reference_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    max_iter: int = 90000
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    grad_clip: float = 0.0  # max global grad norm; 0 turns clipping off
    # mixed precision (autocast): bf16 on a GPU or a CPU (fast where the CPU has bf16 kernels,
    # e.g. AVX512-BF16 or AMX), fp16 on a GPU only (a CPU trains in float32 then)
    amp: Literal["none", "bf16", "fp16"] = "none"


@dataclass
class TrainConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # How Ray places the workers: PACK (fill nodes in turn), SPREAD, STRICT_SPREAD (one per node),
    # STRICT_PACK (all on one node).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    checkpoint_period: int = 500
    keep_checkpoints: int = 2
    checkpoint_metric: str = "val/segm/AP"  # keep the best K checkpoints by this metric
    checkpoint_mode: Literal["max", "min"] = "max"
    eval_period: int = 0  # 0: evaluate at the end only
    log_period: int = 20
    storage_path: str = "runs"  # local folder, shared filesystem or object-store URI
    run_name: str = "tensormask"
    max_failures: int = 2  # worker-group restarts from the latest checkpoint before giving up
    # No batch from Ray Data for this long is an error that says what it waits for (0: wait forever).
    data_timeout_s: float = 300.0
    # Fault injection, to exercise recovery: the last rank raises once at this iteration (0: off).
    fail_at_iter: int = 0


@dataclass
class TrackingConfig:
    mlflow_uri: str = ""  # empty: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "tensormask"
    # log the best checkpoint as an MLflow model at the end of a training run
    log_model: bool = True
    registered_model: str = ""  # also register it (a sweep: its best trial's) under this name
    # validation images drawn (ground truth | prediction) at each validation
    overlay_images: int = 3
    system_metrics_interval: float = 10.0  # seconds between CPU/memory/GPU samples; 0: off


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    assign: AssignConfig = field(default_factory=AssignConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    input: InputConfig = field(default_factory=InputConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    def flat(self) -> dict[str, Any]:
        """Dotted keys to leaf values, e.g. {'model.mask_head': 'bipyramid', ...}."""
        return flatten(self.to_dict())

    def validate(self) -> Config:
        validate(self)
        return self


# The config keys whose values are paths (files, folders, storage URIs): made absolute before a
# config travels to other processes (sweep trials), warned about when relative in a cluster job.
PATH_KEYS = (
    "data.train_shards",
    "data.val_shards",
    "data.val_json",
    "model.backbone.weights",
    "model.weights",
    "train.storage_path",
)


# ----------------------------------------------------------------------------- dict <-> dataclass
def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`, converting where lossless (int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"config key '{key}': null is not allowed")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _set_dotted(cfg: Any, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"unknown config key '{key}'")
        names = {f.name for f in dataclasses.fields(node)}
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(
                f"unknown config key '{key}' ('{part}' is not a field of {where}; "
                f"known: {sorted(names)})"
            )
        hints = get_type_hints(type(node))
        if i == len(parts) - 1:
            tp = hints[part]
            if _is_dataclass_type(tp):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{key}' is a section; give a mapping")
                for k, v in value.items():
                    _set_dotted(getattr(node, part), k, v)
            else:
                setattr(node, part, _coerce(value, tp, key))
        else:
            node = getattr(node, part)


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Returns a copy of `cfg` with dotted-key overrides applied (values already parsed)."""
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        _set_dotted(cfg, key, value)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """'model.window_sizes=[15,11]' -> ('model.window_sizes', [15, 11]) (values are YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"config key '{key}': cannot parse value {raw!r}: {e}") from e
    return key, value


def from_dict(d: dict[str, Any], base: Config | None = None) -> Config:
    """Nested mapping (as in YAML) -> Config, on top of `base` (defaults if None)."""
    if not isinstance(d, dict):
        raise ConfigError("a config must be a mapping of sections")
    return apply_overrides(base or Config(), flatten(d)).validate()


# ----------------------------------------------------------------------------- presets
# Each preset is a YAML file in tensormask_ray/configs/ (NAME.yaml): dotted overrides on the
# defaults above, nested by section. The table presets follow the paper's ResNet-50-FPN ablations
# (Tables 1, 2a-d) and final models (Table 3); d2-* are Detectron2's TensorMask configs.
PRESETS_DIR = Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    """The names of the presets, sorted."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_overrides(name: str) -> dict[str, Any]:
    """The dotted overrides of the preset `name` (configs/NAME.yaml)."""
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset '{name}'; known: {names}")
    path = PRESETS_DIR / f"{name}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {path} must hold a mapping of sections")
    return flatten(data)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    preset: str | None = None,
) -> Config:
    """defaults -> preset -> YAML file -> overrides, then validated."""
    cfg = Config()
    if preset:
        names = [p for p in preset.split("+") if p]
        for name in names:
            cfg = apply_overrides(cfg, preset_overrides(name))
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
        file_preset = data.pop("preset", None)
        if file_preset:
            cfg = load_config(None, None, file_preset if not preset else f"{preset}+{file_preset}")
        cfg = apply_overrides(cfg, flatten(data))
    if overrides:
        if isinstance(overrides, dict):
            items = overrides
        else:
            items = dict(parse_override(o) for o in overrides)
        cfg = apply_overrides(cfg, items)
    return cfg.validate()


def validate(cfg: Config) -> None:
    """Cross-field checks; each error names the key at fault."""
    m = cfg.model
    if m.backbone.depth not in (18, 34, 50, 101):
        raise ConfigError(
            f"config key 'model.backbone.depth': {m.backbone.depth} not in [18, 34, 50, 101]"
        )
    if not 0 <= m.backbone.freeze_at <= 5:
        raise ConfigError("config key 'model.backbone.freeze_at': must be in [0, 5]")
    if not 2 <= m.min_level <= 5 <= m.max_level <= 7:
        raise ConfigError(
            "config keys 'model.min_level'/'model.max_level': need 2 <= min_level <= 5 <= max_level <= 7"
        )
    if m.num_classes < 1:
        raise ConfigError("config key 'model.num_classes': must be >= 1")
    if not m.window_sizes or any(v < 1 for v in m.window_sizes):
        raise ConfigError("config key 'model.window_sizes': a non-empty list of positive sizes")
    if len(set(m.window_sizes)) != len(m.window_sizes):
        raise ConfigError("config key 'model.window_sizes': sizes must be distinct")
    for name in ("fpn_channels", "cls_channels", "box_channels", "mask_channels"):
        if getattr(m, name) < 1:
            raise ConfigError(f"config key 'model.{name}': must be >= 1")
    if m.tower_depth < 0:
        raise ConfigError("config key 'model.tower_depth': must be >= 0")
    if m.backbone.stride_in_1x1 and m.backbone.depth < 50:
        raise ConfigError(
            "config key 'model.backbone.stride_in_1x1': only ResNet-50/101 (bottleneck blocks) "
            f"have a 1x1 conv to put the stride in, not depth {m.backbone.depth}"
        )
    if m.backbone.stride_in_1x1 and m.backbone.weights:
        raise ConfigError(
            "config key 'model.backbone.weights': a torchvision checkpoint has its stride in the 3x3 "
            "convs and does not fit model.backbone.stride_in_1x1=true (it would load and compute garbage)"
        )
    if m.weights and m.backbone.weights:
        raise ConfigError(
            "config keys 'model.weights'/'model.backbone.weights': give one; model.weights holds the "
            "backbone's weights too"
        )
    if len(m.box_weights) != 4 or any(w <= 0 for w in m.box_weights):
        raise ConfigError("config key 'model.box_weights': four positive numbers (wx, wy, ww, wh)")
    if m.geometry == "detectron2" and m.mask_head.startswith("upscale_"):
        raise ConfigError(
            f"config key 'model.mask_head': {m.mask_head} has no Detectron2 counterpart; with "
            "model.geometry=detectron2 use simple_natural, simple_aligned or bipyramid"
        )
    if m.mask_head.startswith("upscale_"):
        lam = m.upscale_factor
        if lam < 1:
            raise ConfigError("config key 'model.upscale_factor': must be >= 1")
        for v in m.window_sizes:
            coarse = v / lam
            if abs(coarse - round(coarse)) > 1e-6 or round(coarse) < 1:
                raise ConfigError(
                    f"config key 'model.upscale_factor': window size {v} / lambda {lam:g} = "
                    f"{coarse:g} is not a whole number of coarse cells"
                )
    s = cfg.solver
    if s.max_iter < 1:
        raise ConfigError("config key 'solver.max_iter': must be >= 1")
    if list(s.steps) != sorted(s.steps):
        raise ConfigError("config key 'solver.steps': must be increasing")
    if s.base_lr <= 0:
        raise ConfigError("config key 'solver.base_lr': must be > 0")
    i = cfg.input
    if len(i.min_size_train) != 2 or i.min_size_train[0] > i.min_size_train[1]:
        raise ConfigError("config key 'input.min_size_train': [low, high] with low <= high")
    if len(i.pixel_mean) != 3 or len(i.pixel_std) != 3:
        raise ConfigError(
            "config keys 'input.pixel_mean'/'input.pixel_std': three values, one per channel"
        )
    if any(s <= 0 for s in i.pixel_std):
        raise ConfigError("config key 'input.pixel_std': must be > 0")
    top = 1.0 if i.format == "RGB" else 255.0
    if any(not 0 <= v <= top for v in i.pixel_mean) or (
        i.format == "BGR255" and max(i.pixel_mean) <= 1
    ):
        raise ConfigError(
            f"config key 'input.pixel_mean': {i.pixel_mean} does not fit input.format={i.format} "
            f"(pixel values in [0, {top:g}]{'; these look like means of 0-1 pixels' if top > 1 else ''})"
        )
    if cfg.data.batch_size_per_worker < 1:
        raise ConfigError("config key 'data.batch_size_per_worker': must be >= 1")
    if cfg.train.num_workers < 1:
        raise ConfigError("config key 'train.num_workers': must be >= 1")
    inf = cfg.inference
    if not 0 < inf.nms_thresh <= 1:
        raise ConfigError("config key 'inference.nms_thresh': must be in (0, 1]")
    if cfg.tracking.overlay_images < 0:
        raise ConfigError("config key 'tracking.overlay_images': must be >= 0 (0: none)")
    if cfg.tracking.system_metrics_interval < 0:
        raise ConfigError(
            "config key 'tracking.system_metrics_interval': must be >= 0 seconds (0: off)"
        )


def known_keys() -> list[str]:
    return sorted(Config().flat().keys())


__all__ = [
    "AssignConfig",
    "BackboneConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "InferenceConfig",
    "InputConfig",
    "LossConfig",
    "ModelConfig",
    "PRESETS_DIR",
    "SolverConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "known_keys",
    "load_config",
    "parse_override",
    "preset_names",
    "preset_overrides",
]

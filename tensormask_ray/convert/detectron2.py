"""Detectron2 TensorMask checkpoints -> checkpoints of this project.

    tensormask-ray convert detectron2 model_final_8f325c.pkl --out converted/r50-1x

Reads a Detectron2 checkpoint (a model-zoo `.pkl`: a pickle of {"model": {name: numpy array},
"__author__": ...}, read with the restricted unpickler of safe_pickle.py; or a `.pth` that
Detectron2's trainer wrote, read with torch.load(weights_only=True)), renames every tensor to this
project's module names, and writes a checkpoint folder in the format train/checkpoint.py writes
(state.pt: weights, the config of the preset, the 80 COCO categories), so `evaluate`, `predict`
and `train model.weights=DIR` take it as they take a trained one.

Every key is accounted for: a key of the model that the file lacks, a key of the file that maps to
nothing, a tensor of the wrong shape, or window sizes in another order than the file's (the
class and box channels come per window size) is an error listing all of them. Detectron2's loader
tolerates three things, and so does this one, as it does:
- frozen batch norms without running_mean / running_var (checkpoints written before its
  FrozenBatchNorm2d had them): identity statistics, 0 and 1;
- `pixel_mean` / `pixel_std` buffers: checked against input.pixel_mean / pixel_std, not loaded;
- `anchor_generator.cell_anchors.*` buffers of old checkpoints: checked against the windows the
  config implies ([-S/2, -S/2, S/2, S/2] per window size), not loaded.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, load_config
from ..errors import UserError
from .safe_pickle import load_array_pickle

DEFAULT_PRESET = "d2-tensormask-r50-1x"
SHOWN = 12  # keys listed per kind of problem in an error

# Our state_dict key -> Detectron2's: (pattern, replacement) applied in order, first match wins.
# {level} / {size} are filled from the config (FPN level numbers, window sizes).
_RULES: list[tuple[str, str]] = [
    (r"^backbone\.stem\.0\.weight$", r"backbone.bottom_up.stem.conv1.weight"),
    (r"^backbone\.stem\.1\.(\w+)$", r"backbone.bottom_up.stem.conv1.norm.\1"),
    (r"^backbone\.(res\d\.\d+)\.conv(\d)\.weight$", r"backbone.bottom_up.\1.conv\2.weight"),
    (r"^backbone\.(res\d\.\d+)\.bn(\d)\.(\w+)$", r"backbone.bottom_up.\1.conv\2.norm.\3"),
    (r"^backbone\.(res\d\.\d+)\.downsample\.0\.weight$", r"backbone.bottom_up.\1.shortcut.weight"),
    (r"^backbone\.(res\d\.\d+)\.downsample\.1\.(\w+)$", r"backbone.bottom_up.\1.shortcut.norm.\2"),
    (r"^fpn\.lateral\.(\d+)\.(\w+)$", "backbone.fpn_lateral{level}.\\2"),
    (r"^fpn\.output\.(\d+)\.(\w+)$", "backbone.fpn_output{level}.\\2"),
    (r"^fpn\.(p6|p7)\.(\w+)$", r"backbone.top_block.\1.\2"),
    (r"^head\.cls_tower\.(\d+)\.(\w+)$", r"head.cls_subnet.\1.\2"),
    (r"^head\.cls_pred\.(\w+)$", r"head.cls_score.\1"),
    (r"^head\.box_tower\.(\d+)\.(\w+)$", r"head.bbox_subnet.\1.\2"),
    (r"^head\.box_pred\.(\w+)$", r"head.bbox_pred.\1"),
    (r"^head\.mask_tower\.(\d+)\.(\w+)$", r"head.mask_subnet.\1.\2"),
    (r"^head\.mask_preds\.(\d+)\.(\w+)$", "head.mask_pred_{size}.\\2"),
    (r"^head\.bipyramid\.fuse\.0\.(\w+)$", r"head.mask_fuse.0.\1"),
]
_BN_STATS = ("running_mean", "running_var")
_ANCHORS = re.compile(r"^anchor_generator\.cell_anchors\.(\d+)$")
_MASK_PRED = re.compile(r"^head\.mask_pred_(\d+)\.weight$")


def detectron2_name(key: str, cfg: Config) -> str:
    """Detectron2's name of our state_dict key `key` for a model built from `cfg`."""
    m = cfg.model
    for pattern, replacement in _RULES:
        match = re.match(pattern, key)
        if match is None:
            continue
        index = int(match.group(1)) if "{" in replacement else 0
        replacement = replacement.replace("{level}", str(m.min_level + index))
        replacement = replacement.replace(
            "{size}", f"{m.window_sizes[index]:02d}" if "{size}" in replacement else ""
        )
        return match.expand(replacement)
    raise UserError(
        f"no Detectron2 name for this model's key '{key}' (model.mask_head={m.mask_head}?)"
    )


def read_detectron2_checkpoint(path: str | Path) -> dict[str, np.ndarray | torch.Tensor]:
    """The model's tensors of a Detectron2 checkpoint: a model-zoo .pkl or a trainer .pth."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"Detectron2 checkpoint not found: {p}")
    if p.suffix == ".pkl":
        data = load_array_pickle(p)
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            keys = sorted(data)[:5] if isinstance(data, dict) else type(data).__name__
            raise UserError(
                f"{p} is not a Detectron2 model file: expected a dict with a 'model' dict of arrays, "
                f"found {keys} (a Caffe2/Detectron1 'blobs' file, e.g. an ImageNet R-50.pkl, is not a "
                "TensorMask checkpoint)"
            )
        return dict(data["model"])
    if p.suffix in (".pth", ".pt"):
        try:
            data = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's
            raise UserError(f"{p} could not be read with torch.load(weights_only=True): {e}") from e
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            data = data["model"]
        if not isinstance(data, dict):
            raise UserError(f"{p} holds a {type(data).__name__}, not a state dict")
        return dict(data)
    raise UserError(f"{p}: expected a Detectron2 .pkl (model zoo) or .pth (trainer) file")


def _tensor(value: Any, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value
    elif isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
        t = torch.from_numpy(np.ascontiguousarray(value))
    else:
        raise UserError(
            f"Detectron2 key '{key}' holds a {type(value).__name__}, not a numeric array"
        )
    return t.detach().to(torch.float32).clone()


def _listed(kind: str, items: list[str]) -> str:
    more = f" ... ({len(items)} in all)" if len(items) > SHOWN else ""
    return f"{kind} ({len(items)}): {items[:SHOWN]}{more}"


def convert_state_dict(
    d2_state: dict[str, Any], cfg: Config, own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Detectron2 tensors -> our state dict for a model whose state_dict() is `own` (names and
    shapes). Raises UserError listing every missing, unmapped and mis-shaped key at once."""
    names = {key: detectron2_name(key, cfg) for key in own}
    out: dict[str, torch.Tensor] = {}
    missing, wrong = [], []
    for key, d2_key in names.items():
        if d2_key not in d2_state:
            stat = d2_key.rsplit(".", 1)[-1]
            if stat in _BN_STATS and d2_key.rsplit(".", 1)[0] + ".weight" in d2_state:
                # FrozenBatchNorm2d._load_from_state_dict: statistics absent -> identity
                out[key] = (
                    torch.zeros_like(own[key])
                    if stat == "running_mean"
                    else torch.ones_like(own[key])
                )
                continue
            missing.append(d2_key)
            continue
        t = _tensor(d2_state[d2_key], d2_key)
        if tuple(t.shape) != tuple(own[key].shape):
            wrong.append(f"{d2_key}: file {tuple(t.shape)} vs model {tuple(own[key].shape)}")
            continue
        out[key] = t
    used = set(names.values())
    extra = sorted(k for k in d2_state if k not in used and not _tolerated(k))
    problems = _check_window_order(d2_state, cfg) + _check_tolerated(d2_state, cfg)
    if missing or extra or wrong or problems:
        parts = []
        if missing:
            parts.append(_listed("missing keys", sorted(missing)))
        if extra:
            parts.append(_listed("keys that map to nothing in this model", extra))
        if wrong:
            parts.append(_listed("shape mismatches", wrong))
        parts += problems
        raise UserError(
            f"the Detectron2 checkpoint does not fit the config (model.window_sizes "
            f"{cfg.model.window_sizes}, levels P{cfg.model.min_level}-P{cfg.model.max_level}, "
            f"R-{cfg.model.backbone.depth}): " + "; ".join(parts)
        )
    return out


def _check_window_order(d2_state: dict[str, Any], cfg: Config) -> list[str]:
    """The class and box channels come per anchor in ANCHOR_GENERATOR.SIZES order, which the file
    records only as the order of its mask_pred_* modules (registered in that order; state dicts
    and the model zoo's pickles keep it). Window sizes in another order would load and compute
    every class score of one window size for the other."""
    order = []
    for key in d2_state:
        match = _MASK_PRED.match(key)
        if match and int(match.group(1)) not in order:
            order.append(int(match.group(1)))
    if (
        order
        and sorted(order) == sorted(cfg.model.window_sizes)
        and order != list(cfg.model.window_sizes)
    ):
        return [
            f"the checkpoint's windows come in the order {order} (its mask_pred_* modules, i.e. "
            f"ANCHOR_GENERATOR.SIZES), not model.window_sizes {cfg.model.window_sizes}: pass "
            f"model.window_sizes={order}"
        ]
    return []


def _tolerated(key: str) -> bool:
    return key in ("pixel_mean", "pixel_std") or _ANCHORS.match(key) is not None


def _check_tolerated(d2_state: dict[str, Any], cfg: Config) -> list[str]:
    """The buffers Detectron2 does not load must agree with the config we write."""
    problems = []
    for key, expected in (("pixel_mean", cfg.input.pixel_mean), ("pixel_std", cfg.input.pixel_std)):
        if key in d2_state:
            value = _tensor(d2_state[key], key).flatten()
            if value.numel() != 3 or not torch.allclose(value, torch.tensor(expected), atol=1e-3):
                problems.append(
                    f"'{key}' is {value.tolist()} but input.{key} is {expected} (pass input.{key}=[...] "
                    "and input.format to match the model)"
                )
    strides = [2**lv for lv in range(cfg.model.min_level, cfg.model.max_level + 1)]
    cell = strides[0]
    for key in sorted(k for k in d2_state if _ANCHORS.match(k)):
        level = int(_ANCHORS.match(key).group(1))
        if level >= len(strides):
            problems.append(f"'{key}': the config has {len(strides)} levels")
            continue
        sides = [v * cell * 2**level for v in cfg.model.window_sizes]
        expected = torch.tensor([[-s / 2, -s / 2, s / 2, s / 2] for s in sides])
        value = _tensor(d2_state[key], key)
        if value.shape != expected.shape or not torch.allclose(value, expected):
            problems.append(
                f"'{key}' holds windows {value.tolist()} but model.window_sizes {cfg.model.window_sizes} "
                f"give {expected.tolist()} at level P{cfg.model.min_level + level}"
            )
    return problems


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def convert_detectron2(
    path: str | Path,
    out_dir: str | Path,
    preset: str = DEFAULT_PRESET,
    overrides: list[str] | dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Converts Detectron2 checkpoint `path` into a checkpoint folder `out_dir` (state.pt and
    config.yaml) for the config `preset` + `overrides`. Returns the folder."""
    from ..data.coco_categories import coco_categories
    from ..modeling import build_model
    from ..modeling.checkpoint_file import STATE_FILE, load_weights
    from ..train.checkpoint import save_training_state

    out = Path(out_dir)
    if (out / STATE_FILE).exists() and not overwrite:
        raise UserError(f"{out / STATE_FILE} exists; pass --overwrite to replace it")
    cfg = load_config(None, overrides, preset)
    if cfg.model.weights or cfg.model.backbone.weights:
        raise UserError(
            "model.weights / model.backbone.weights make no sense for a conversion: the file holds them"
        )
    src = Path(path)
    d2_state = read_detectron2_checkpoint(src)
    model = build_model(cfg)
    state = convert_state_dict(d2_state, cfg, model.state_dict())
    load_weights(model, state, src)  # strict: every key, every shape
    categories = coco_categories() if cfg.model.num_classes == 80 else []
    if not categories:
        raise UserError(
            f"model.num_classes={cfg.model.num_classes}: only COCO's 80 categories ship with this "
            "converter; a model of other classes needs its categories"
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # fresh: the format has one
    save_training_state(out, model, optimizer, 0, 0, cfg, categories=categories)
    # Provenance beside the weights: what was converted, with which preset.
    (out / "config.yaml").write_text(cfg.to_yaml())
    (out / "SOURCE").write_text(
        f"converted from Detectron2 checkpoint {src.resolve()}\nsha256 {sha256(src)}\npreset {preset}\n"
        f"overrides {overrides or []}\n"
    )
    return out

"""Save / restore of the full training state in one place, and loading a checkpoint for inference.

A checkpoint is a folder holding `state.pt`: {"model", "optimizer", "scheduler", "iteration",
"epoch", "rng", "config", "categories"}, written with torch.save and read back with
torch.load(weights_only=True) (plain tensors, numbers, strings, lists and dicts only).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, ConfigError, from_dict
from ..errors import UserError

STATE_FILE = "state.pt"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(np.random.get_state()[1].tobytes(), dtype=np.uint8).copy()),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = np.frombuffer(state["numpy"].numpy().tobytes(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    epoch: int,
    cfg: Config,
    categories: list[dict] | None = None,
    scheduler: dict | None = None,
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler or {},
        "iteration": int(iteration),
        "epoch": int(epoch),
        "rng": rng_state(),
        "config": cfg.to_dict(),
        "categories": categories or [],
    }
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.rename(folder / STATE_FILE)
    return folder / STATE_FILE


def read_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint folder or its state.pt -> the state dict (weights_only loading)."""
    p = Path(path)
    if p.is_dir():
        p = p / STATE_FILE
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is the file's
        raise UserError(f"checkpoint {p} could not be read: {e}") from e


def load_training_state(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restores model, optimiser and RNG; returns the state (iteration, epoch, ...)."""
    state = read_state(folder)
    load_weights(_unwrap(model), state["model"], folder)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Any) -> None:
    """Strict load with an error naming the mismatched keys and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if wrong:
            shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:6]]
            parts.append(f"shape mismatches {shapes}")
        raise UserError(f"checkpoint {source} does not match the model config: " + "; ".join(parts))
    model.load_state_dict(weights)


def load_model_for_inference(path: str | Path, overrides: dict[str, Any] | None = None, device: str = "cpu"):
    """(model in eval mode, Config, categories) from a checkpoint folder or state.pt. `overrides`
    (dotted keys, e.g. inference.score_thresh) apply to the stored config."""
    from ..config import apply_overrides
    from ..modeling import build_model

    state = read_state(path)
    try:
        cfg = from_dict(state["config"])
    except ConfigError as e:
        raise UserError(f"checkpoint {path}: stored config is invalid: {e}") from e
    if overrides:
        cfg = apply_overrides(cfg, overrides).validate()
    cfg.model.backbone.weights = None  # the checkpoint holds every weight
    model = build_model(cfg)
    load_weights(model, state["model"], path)
    return model.to(device).eval(), cfg, list(state.get("categories") or [])


def export_for_inference(checkpoint: str, folder: str | Path) -> int:
    """Writes `folder/state.pt`: what inference needs of a training checkpoint (weights, config,
    categories, iteration; no optimiser or RNG state), the weights an MLflow model holds. Returns
    the checkpoint's iteration. `checkpoint`: a local folder or a storage URI (s3://, gs://)."""
    import tempfile

    from . import storage

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if "://" in checkpoint:
        with tempfile.TemporaryDirectory() as tmp:
            storage.copy_to_local(storage.join(checkpoint, STATE_FILE), Path(tmp) / STATE_FILE)
            state = read_state(tmp)
    else:
        state = read_state(checkpoint)
    keep = {k: state[k] for k in ("model", "config", "categories", "iteration", "epoch") if k in state}
    torch.save(keep, folder / STATE_FILE)
    return int(state.get("iteration", 0))

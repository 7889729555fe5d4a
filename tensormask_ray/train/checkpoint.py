"""Save / restore of the full training state in one place, and loading a checkpoint for inference.

A checkpoint is a folder holding `state.pt`: {"model", "optimizer", "scheduler", "iteration",
"epoch", "rng", "config", "categories"}, written with torch.save and read back with
torch.load(weights_only=True) (plain tensors, numbers, strings, lists and dicts only).

"rng" holds the RNG state of every rank (a list in rank order, gathered by rank 0, which writes
the checkpoint), so that each rank of a resumed run continues its own random stream rather than
all of them restarting rank 0's. Checkpoints written before that hold one state (a dict).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, ConfigError, from_dict
from ..errors import UserError
from ..modeling.checkpoint_file import STATE_FILE, load_weights, read_state

# The names in a run folder, here and nowhere else:
#   <run folder>/checkpoint_0000500/state.pt   a checkpoint (CHECKPOINT_PREFIX + iteration; its
#                                              STATE_FILE: modeling.checkpoint_file)
#   <run folder>/progress.json                 the newest checkpoint's {"iteration", "epoch"}
#   <run folder>/mlflow_run_id                 the MLflow run the training logs to
#   <trial folder>/result.json                 Ray Tune's JSON lines of a trial's reports
CHECKPOINT_PREFIX = "checkpoint_"
PROGRESS_FILE = "progress.json"
MLFLOW_RUN_FILE = "mlflow_run_id"
TRIAL_RESULT_FILE = "result.json"


def checkpoint_dir_name(iteration: int) -> str:
    """The run folder's name for the checkpoint written at `iteration` (deterministic, so that its
    path can travel with the metrics and be found again)."""
    return f"{CHECKPOINT_PREFIX}{int(iteration):07d}"


def iteration_of(path: str) -> int | None:
    """The iteration in a checkpoint folder's name, or None for another name."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    digits = name[len(CHECKPOINT_PREFIX) :]
    return int(digits) if name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG state (python, numpy, torch CPU, and the CUDA generator of `device`)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(
            np.frombuffer(np.random.get_state()[1].tobytes(), dtype=np.uint8).copy()
        ),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    keys = np.frombuffer(state["numpy"].numpy().tobytes(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    cuda = state.get("cuda")
    if cuda is not None and device is not None and device.type == "cuda":
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible device's state
            index = device.index if device.index is not None else torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def rank_rng_state(state: dict[str, Any], rank: int) -> dict[str, Any] | None:
    """The saved RNG state of `rank` in a checkpoint's state, or None when the run that wrote it
    had fewer ranks (then the caller seeds that rank afresh)."""
    rng = state.get("rng")
    per_rank = [rng] if isinstance(rng, dict) else list(rng or [])
    return per_rank[rank] if rank < len(per_rank) else None


def save_training_state(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    epoch: int,
    cfg: Config,
    categories: list[dict] | None = None,
    scheduler: dict | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """`rng_states`: the RNG state of every rank, in rank order (default: this process's only)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler or {},
        "iteration": int(iteration),
        "epoch": int(epoch),
        "rng": list(rng_states) if rng_states is not None else [rng_state()],
        "config": cfg.to_dict(),
        "categories": categories or [],
    }
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.rename(folder / STATE_FILE)
    return folder / STATE_FILE


def load_training_state(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    rank: int = 0,
    device: torch.device | None = None,
) -> dict:
    """Restores model, optimiser and this rank's RNG; returns the state (iteration, epoch, ...)
    with "rng_restored": False when the checkpoint holds no RNG state for `rank`."""
    state = read_state(folder)
    load_weights(_unwrap(model), state["model"], folder)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    mine = rank_rng_state(state, rank)
    if mine is not None:
        set_rng_state(mine, device)
    state["rng_restored"] = mine is not None
    return state


def load_model_for_inference(
    path: str | Path, overrides: dict[str, Any] | None = None, device: str = "cpu"
):
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
    cfg.model.weights = None
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
    keep = {
        k: state[k] for k in ("model", "config", "categories", "iteration", "epoch") if k in state
    }
    torch.save(keep, folder / STATE_FILE)
    return int(state.get("iteration", 0))

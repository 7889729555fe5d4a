"""A checkpoint's state.pt, as the model needs it: which file a path names, reading it safely
(torch.load with weights_only=True: plain tensors, numbers, strings, lists and dicts only), and
loading its weights into a model strictly. What else a checkpoint holds and how training writes
and resumes one is train.checkpoint's; this is what `build_model` needs to fine-tune from one
(`model.weights`), so it lives in the model's layer.

Errors are UserErrors that say what a path is instead of a checkpoint and name the checkpoints
found beside it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

STATE_FILE = "state.pt"  # a checkpoint folder's file: {"model", "config", ...}


def find_checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoints (folders holding state.pt) in `folder` and its subfolders one level down
    (a training run's folder holds checkpoint_0000100/, ...; a sweep's trial folder likewise),
    sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [d for d in [folder, *folder.iterdir()] if d.is_dir() and (d / STATE_FILE).is_file()]
    found += [
        d
        for sub in folder.iterdir()
        if sub.is_dir()
        for d in sub.iterdir()
        if d.is_dir() and (d / STATE_FILE).is_file()
    ]
    return sorted(set(found))


def _found_in(folder: Path, limit: int = 5) -> str:
    found = find_checkpoints(folder)
    if not found:
        return f"There is no checkpoint in {folder}."
    names = [str(p) for p in found[-limit:]]
    more = f" (and {len(found) - limit} older)" if len(found) > limit else ""
    return f"Checkpoints in {folder}: {', '.join(names)}{more}."


_WHAT_A_CHECKPOINT_IS = (
    "a checkpoint is a folder holding state.pt, like <run folder>/checkpoint_0000500 written by "
    "`tensormask-ray train`, or that state.pt"
)


def state_path(path: str | Path) -> Path:
    """The state.pt a path names: `path/state.pt` for a folder, else `path` itself (unchecked;
    `checkpoint_file` checks it)."""
    p = Path(path)
    return p / STATE_FILE if p.is_dir() else p


def checkpoint_file(path: str | Path) -> Path:
    """The state.pt of a checkpoint folder (or the file itself); a UserError that says what the
    path is instead and names the checkpoints found beside it when it is not one of ours."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {p}: no such file or folder. {_found_in(p.parent)}")
    if p.is_dir():
        if not (p / STATE_FILE).is_file():
            raise UserError(
                f"{p} is not a checkpoint: it holds no {STATE_FILE} ({_WHAT_A_CHECKPOINT_IS}). {_found_in(p)}"
            )
        return p / STATE_FILE
    if not zipfile.is_zipfile(p):  # torch.save writes a zip archive
        with p.open("rb") as f:
            head = f.read(64).lstrip()
        kind = "a JSON file" if head[:1] in (b"{", b"[") else "not a PyTorch file"
        raise UserError(
            f"{p} is not a checkpoint: it is {kind} ({_WHAT_A_CHECKPOINT_IS}). {_found_in(p.parent)}"
        )
    return p


def read_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint folder or its state.pt -> the state dict (weights_only loading)."""
    p = checkpoint_file(path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is the file's
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"checkpoint {p} could not be read ({reason}); {_WHAT_A_CHECKPOINT_IS}"
        ) from e
    if not isinstance(state, dict) or not {"model", "config"} <= set(state):
        raise UserError(
            f"{p} is a PyTorch file but not a tensormask-ray checkpoint (no 'model' and 'config' "
            f"entries); {_WHAT_A_CHECKPOINT_IS}. {_found_in(p.parent)}"
        )
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
            shapes = [
                f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
                for k in wrong[:6]
            ]
            parts.append(f"shape mismatches {shapes}")
        raise UserError(f"checkpoint {source} does not match the model config: " + "; ".join(parts))
    model.load_state_dict(weights)


__all__ = [
    "STATE_FILE",
    "checkpoint_file",
    "find_checkpoints",
    "load_weights",
    "read_state",
    "state_path",
]

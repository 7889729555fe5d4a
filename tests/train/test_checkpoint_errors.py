"""`--checkpoint` that is not one of our checkpoints is an error that says what it is and names
the checkpoints found in that folder (issue 17: a run folder's JSON gave PyTorch's whole
weights_only essay)."""

from __future__ import annotations

import json

import pytest
import torch

from tensormask_ray import cli
from tensormask_ray.errors import UserError
from tensormask_ray.modeling.checkpoint_file import STATE_FILE, find_checkpoints, read_state


@pytest.fixture
def run_folder(tmp_path):
    """A training run's folder as Ray Train leaves it: two checkpoints and its own JSON."""
    run = tmp_path / "runs" / "demo"
    for it in (110, 220):
        (run / f"checkpoint_{it:07d}").mkdir(parents=True)
        torch.save(
            {"model": {}, "config": {}, "iteration": it}, run / f"checkpoint_{it:07d}" / STATE_FILE
        )
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoints": []}))
    (run / "notes.txt").write_text("not a checkpoint\n")
    return run


def test_checkpoints_in_a_run_folder_are_found(run_folder):
    assert [p.name for p in find_checkpoints(run_folder)] == [
        "checkpoint_0000110",
        "checkpoint_0000220",
    ]
    assert find_checkpoints(run_folder / "checkpoint_0000110") == [
        run_folder / "checkpoint_0000110"
    ]
    assert find_checkpoints(run_folder / "nowhere") == []


@pytest.mark.parametrize(
    "name, says",
    [
        ("checkpoint_manager_snapshot.json", "is not a checkpoint: it is a JSON file"),
        ("notes.txt", "is not a checkpoint: it is not a PyTorch file"),
        (".", f"is not a checkpoint: it holds no {STATE_FILE}"),
    ],
)
def test_not_a_checkpoint_says_so_and_names_those_found(run_folder, name, says):
    with pytest.raises(UserError) as e:
        read_state(run_folder / name)
    message = str(e.value)
    assert says in message
    assert (
        f"Checkpoints in {run_folder}: {run_folder / 'checkpoint_0000110'}, {run_folder / 'checkpoint_0000220'}"
        in message
    )
    assert "weights_only" not in message and "file an issue" not in message


def test_a_pytorch_file_that_is_not_ours(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "resnet18.pth")
    with pytest.raises(
        UserError,
        match=r"resnet18.pth is a PyTorch file but not a tensormask-ray checkpoint .*There is no checkpoint in",
    ):
        read_state(tmp_path / "resnet18.pth")


def test_evaluate_names_the_file_before_any_work(run_folder, tmp_path, capsys):
    rc = cli.main(
        [
            "evaluate",
            "--checkpoint",
            str(run_folder / "checkpoint_manager_snapshot.json"),
            "--shards",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert (
        "--checkpoint:" in err
        and "checkpoint_manager_snapshot.json is not a checkpoint: it is a JSON file" in err
    )
    assert "checkpoint_0000220" in err and "Traceback" not in err

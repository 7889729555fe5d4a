"""The sweep's trial scheduler: ASHA that survives `--resume`.

Tune saves its trials and its search algorithm when a sweep is interrupted, but not the
scheduler's state: `Tuner.restore` brings back the ASHA object as it was when the sweep started,
with empty rungs. A resumed sweep would then let every remaining trial pass every rung (nothing
recorded to compare with). `ResumableASHA` rebuilds the rungs instead: Tune hands every restored
trial (finished ones included) to `on_trial_add`, and the scheduler replays that trial's
reported results (`result.json`) into its bracket, recording at each rung the same value the
uninterrupted sweep recorded (replayed results only fill the rungs; they stop nothing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from .. import ray_compat
from ..finite import is_finite_number
from ..train.checkpoint import TRIAL_RESULT_FILE


def reported_results(trial) -> list[dict[str, Any]]:
    """The results a trial reported so far (oldest first), from its driver-side staging folder or
    its folder in the sweep's storage, whichever holds more; [] for a new trial."""
    texts: list[str] = []
    try:
        local = Path(trial.local_path or "", TRIAL_RESULT_FILE)
        if trial.local_path and local.is_file():
            texts.append(local.read_text())
    except (OSError, RuntimeError):  # RuntimeError: a trial without a folder yet
        pass
    filesystem = ray_compat.trial_filesystem(trial)
    try:
        with filesystem.open_input_stream(f"{trial.path}/{TRIAL_RESULT_FILE}") as f:
            texts.append(f.readall().decode())
    except (OSError, RuntimeError):  # no file yet (pyarrow: OSError), or no folder yet
        pass
    text = max(texts, key=len, default="")
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by the interruption
            continue
    return out


class ResumableASHA(ASHAScheduler):
    """ASHAScheduler whose rungs are rebuilt from the trials' reported results when Tune restores
    a sweep (see the module doc). Same arguments as ASHAScheduler."""

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if not getattr(trial, "has_reported_at_least_once", True):  # a new trial
            return
        bracket = ray_compat.asha_bracket(self, trial.trial_id)
        time_attr, metric, sign = ray_compat.asha_result_keys(self)
        for result in reported_results(trial):
            t, value = result.get(time_attr), result.get(metric)
            if is_finite_number(t) and is_finite_number(value):
                bracket.on_result(trial, t, sign * value)  # records; the decision is moot

    def rungs(self) -> list[tuple[float, dict[str, float]]]:
        """[(milestone, {trial id: recorded value (sign: higher is better)})], highest first."""
        return ray_compat.asha_rungs(self, bracket=0)

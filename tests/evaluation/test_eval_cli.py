"""`tensormask-ray evaluate` end to end: shards or COCO json + images, Ray actors or in-process,
metrics printed, written and logged as an evaluation run nested under the checkpoint's MLflow run
(or under the run that logged a registered model, `--model models:/NAME/1`), a rerun resuming, AP = 1 when
the "model" returns the ground truth (through the whole CLI path: actors' records, the log,
detections.json, pycocotools), test-dev result files, and the errors a user can make."""

from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from tensormask_ray import cli
from tensormask_ray.data.manifest import CategoryMap, read_manifest
from tensormask_ray.data.transforms import decode_image
from tensormask_ray.evaluation import predictor
from tensormask_ray.evaluation.coco import METRIC_NAMES
from tensormask_ray.evaluation.ground_truth import (
    coco_gt_from_json,
    coco_gt_from_shards,
    instances_from_coco,
)

from .checkpoints import make_checkpoint
from .synthetic import erode_masks

KEYS = [f"{t}/{n}" for t in ("segm", "bbox") for n in METRIC_NAMES]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_shards):
    """A training run's folder as `train` leaves it: checkpoint_*/state.pt and mlflow_run_id,
    with the run in an MLflow store named by the checkpoint's config."""
    from tensormask_ray.tracking import RunLogger

    root = tmp_path_factory.mktemp("train")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_dir = root / "runs" / "tiny"
    categories = read_manifest(synth_shards)["categories"]
    checkpoint = make_checkpoint(
        run_dir / "checkpoint_0000007", categories, **{"tracking.mlflow_uri": uri}
    )
    logger = RunLogger.create(uri, "tensormask-eval-test", "tiny")
    logger.end()
    (run_dir / "mlflow_run_id").write_text(logger.run_id)
    return {"checkpoint": checkpoint, "uri": uri, "run_id": logger.run_id, "root": root}


def evaluate(*args) -> int:
    return cli.main(["evaluate", *map(str, args)])


def evaluation_run(uri: str, run_id: str):
    """The evaluation run `run_id`, checked to be a finished run."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("eval ")
    return run


@pytest.mark.ray
@pytest.mark.slow
def test_shards_with_actors_print_write_log_and_resume(
    tmp_path, ray_local, trained, synth_shards, capsys
):
    out = tmp_path / "eval"
    ckpt = trained["checkpoint"]
    rc = evaluate("--checkpoint", ckpt, "--shards", synth_shards, "--out", out, "--max-images", 6,
                  "--num-actors", 2, "--batch-size", 2)  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "AP50" in printed and "segm" in printed and "bbox" in printed

    summary = json.loads((out / "metrics.json").read_text())
    assert sorted(summary["metrics"]) == sorted(KEYS)
    assert summary["num_images"] == 6 and summary["iteration"] == 7
    assert summary["mlflow_parent_run_id"] == trained["run_id"]
    run = evaluation_run(trained["uri"], summary["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == trained["run_id"]
    assert run.info.run_name == f"eval checkpoint_0000007 {synth_shards.name}"
    assert summary["inference"]["min_size_test"] == 96  # the checkpoint's config
    gt = coco_gt_from_shards(synth_shards)
    detections = gt.loadRes(str(out / "detections.json"))  # pycocotools takes the raw detections
    assert len(detections.getAnnIds()) == summary["num_detections"] == 6 * 10

    logged = run.data.metrics
    for key in KEYS:
        if summary["metrics"][key] >= 0:
            assert logged[f"eval/{key}"] == pytest.approx(summary["metrics"][key])
    assert logged["eval/num_images"] == 6

    # A rerun over more images keeps the six done ones and runs the other two (in-process).
    rc = evaluate("--checkpoint", ckpt, "--shards", synth_shards, "--out", out, "--max-images", 8,
                  "--num-actors", 0, "--no-mlflow")  # fmt: skip
    assert rc == 0
    assert "resuming: 6 of 8 images already done" in capsys.readouterr().err
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 1 + 8
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 8


def test_mlflow_run_names_the_checkpoint_and_gets_the_metrics(tmp_path, trained, synth_shards):
    from tensormask_ray.tracking import RunLogger

    RunLogger(trained["uri"], trained["run_id"]).set_tags(
        {"best_checkpoint": str(trained["checkpoint"])}
    )
    rc = evaluate("--mlflow-run", trained["run_id"], "--mlflow-uri", trained["uri"], "--shards",
                  synth_shards, "--out", tmp_path, "--max-images", 2, "--num-actors", 0,
                  "--metric-prefix", "eval-mlflow")  # fmt: skip
    assert rc == 0
    run_id = json.loads((tmp_path / "metrics.json").read_text())["mlflow_run_id"]
    run = evaluation_run(trained["uri"], run_id)
    assert run.data.metrics["eval-mlflow/num_images"] == 2
    assert run.data.tags["mlflow.parentRunId"] == trained["run_id"]


def test_a_registered_model_evaluates_under_the_run_that_logged_it(
    tmp_path, trained, synth_shards, synth_coco
):
    import mlflow

    from tensormask_ray.evaluation.mlflow_model import LOADER_MODULE
    from tensormask_ray.tracking import RunLogger
    from tensormask_ray.train.trainer import log_checkpoint_model

    model_id, version = log_checkpoint_model(
        RunLogger(trained["uri"], trained["run_id"]),
        str(trained["checkpoint"]),
        "tiny-model",
        model_loader=LOADER_MODULE,
    )
    # logging the same checkpoint again registers the model already logged
    assert log_checkpoint_model(
        RunLogger(trained["uri"], trained["run_id"]),
        str(trained["checkpoint"]),
        "tiny-model",
        model_loader=LOADER_MODULE,
    ) == (model_id, str(int(version) + 1))
    rc = evaluate("--model", f"models:/tiny-model/{version}", "--mlflow-uri", trained["uri"], "--shards", synth_shards,
                  "--out", tmp_path, "--max-images", 2, "--num-actors", 0)  # fmt: skip
    assert rc == 0
    assert (tmp_path / "model" / "MLmodel").is_file()  # downloaded into --out
    summary = json.loads((tmp_path / "metrics.json").read_text())
    run = evaluation_run(trained["uri"], summary["mlflow_run_id"])
    assert run.info.run_name == f"eval tiny-model v{version} {synth_shards.name}"
    assert run.data.tags["mlflow.parentRunId"] == trained["run_id"]
    assert run.data.params["model"] == f"models:/tiny-model/{version}"
    assert evaluate("--model", "models:/no-such-model/1", "--mlflow-uri", trained["uri"], "--shards", synth_shards,
                    "--out", tmp_path / "x", "--num-actors", 0) == 2  # fmt: skip
    # MLflow's own loader runs it too (a pyfunc model): COCO-style detections per image
    mlflow.set_tracking_uri(trained["uri"])
    image = sorted(synth_coco.images_dir.iterdir())[0]
    detections = mlflow.pyfunc.load_model(f"models:/tiny-model/{version}").predict([str(image)])
    assert len(detections) == 1 and len(detections[0]) == 10  # the tiny config keeps 10 per image
    assert {"category_id", "bbox", "score", "segmentation"} <= set(detections[0][0])


@pytest.fixture
def ground_truth_model(monkeypatch, synth_coco):
    """Replaces the network with the ground truth of whichever image it is shown (recognised by
    its pixels): what reaches pycocotools then went through every other step of `evaluate`."""
    gt = coco_gt_from_json(synth_coco.json)
    categories = CategoryMap.from_categories(gt.dataset["categories"])
    by_pixels = {}
    for image_id, info in gt.imgs.items():
        pixels = decode_image((synth_coco.images_dir / info["file_name"]).read_bytes())
        by_pixels[hashlib.sha1(pixels.tobytes()).hexdigest()] = image_id
    erosion = {"radius": 0}

    def predict_image(model, image, cfg, device="cpu"):
        image_id = by_pixels[hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()]
        instances = instances_from_coco(gt, image_id, categories)
        if erosion["radius"]:
            instances["masks"] = erode_masks(instances["masks"], erosion["radius"])
        return {**instances, "scores": torch.ones(len(instances["labels"]))}

    monkeypatch.setattr(predictor, "predict_image", predict_image)
    return erosion


def test_ground_truth_as_detections_gives_ap_1_and_eroded_masks_less(
    tmp_path, trained, synth_coco, ground_truth_model
):
    common = ["--checkpoint", trained["checkpoint"], "--coco-json", synth_coco.json,
              "--images-dir", synth_coco.images_dir, "--max-images", 12, "--num-actors", 0,
              "--no-mlflow"]  # fmt: skip
    assert evaluate(*common, "--out", tmp_path / "exact") == 0
    exact = json.loads((tmp_path / "exact" / "metrics.json").read_text())["metrics"]
    assert all(exact[k] in (1.0, -1.0) for k in KEYS), exact
    assert exact["segm/AP"] == exact["bbox/AP"] == 1.0

    ground_truth_model["radius"] = 2
    assert evaluate(*common, "--out", tmp_path / "eroded") == 0
    eroded = json.loads((tmp_path / "eroded" / "metrics.json").read_text())["metrics"]
    assert eroded["segm/AP"] < 0.9
    assert eroded["bbox/AP"] == 1.0  # the boxes are still the ground truth's


def image_info(tmp_path, synth_coco, n: int, extra: list[dict] = ()):
    data = json.loads(synth_coco.json.read_text())
    info = {"images": data["images"][:n] + list(extra), "categories": data["categories"]}
    path = tmp_path / "image_info_test-dev2017.json"
    path.write_text(json.dumps(info))
    return path


def test_test_dev_from_shards_writes_the_server_files(tmp_path, trained, synth_coco):
    from tensormask_ray.data.coco_to_parquet import prepare

    info = image_info(tmp_path, synth_coco, 5)
    shards = tmp_path / "test-dev-shards"
    prepare(info, synth_coco.images_dir, shards, workers=1)  # an image-info json: no annotations
    out = tmp_path / "out"
    rc = evaluate("--checkpoint", trained["checkpoint"], "--split", "test-dev", "--image-info", info,
                  "--shards", shards, "--name", "tiny-r18", "--out", out, "--num-actors", 0)  # fmt: skip
    assert rc == 0
    name = "detections_test-dev2017_tiny-r18_results.json"
    with zipfile.ZipFile(out / name.replace(".json", ".zip")) as z:
        assert z.namelist() == [name]
    loaded = COCO(str(info)).loadRes(str(out / name))  # what the server's code does
    assert sorted(loaded.getImgIds()) == sorted(
        im["id"] for im in json.loads(info.read_text())["images"]
    )
    assert {a["category_id"] for a in loaded.anns.values()} <= {1, 3, 7, 12}
    assert not (out / "metrics.json").exists()  # no ground truth, no metric


def test_test_dev_with_a_missing_image_names_it_and_writes_nothing(
    tmp_path, trained, synth_coco, capsys
):
    missing = {"id": 999, "file_name": "gone.jpg", "height": 10, "width": 10}
    info = image_info(tmp_path, synth_coco, 2, [missing])
    rc = evaluate("--checkpoint", trained["checkpoint"], "--split", "test-dev", "--image-info", info,
                  "--images-dir", synth_coco.images_dir, "--out", tmp_path / "out", "--num-actors", 0)  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "gone.jpg (image 999): cannot read or decode the image (no such file)" in err
    assert "1 images of the image-info file were not processed: 999" in err
    assert not list((tmp_path / "out").glob("detections_*"))


def test_checkpoint_not_matching_its_config_names_the_keys(tmp_path, trained, synth_shards, capsys):
    state = torch.load(trained["checkpoint"] / "state.pt", weights_only=True)
    state["config"]["model"]["num_classes"] = 5
    bad = tmp_path / "checkpoint_bad"
    bad.mkdir()
    torch.save(state, bad / "state.pt")
    rc = evaluate("--checkpoint", bad, "--shards", synth_shards, "--out", tmp_path / "out")
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not match the model config" in err and "head.cls_pred.weight" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--split", "test-dev", "--images-dir", "x"], "--split test-dev needs --image-info"),
        ([], "give the data as --shards DIR, or --coco-json FILE with --images-dir DIR"),
        (["--shards", "s", "--min-size", "0"], "--min-size 0: must be a positive number of pixels"),
        (["--shards", "s", "--score-thresh", "1.5"], "--score-thresh 1.5: must be in [0, 1]"),
        (["--shards", "s", "--num-actors", "-1"], "--num-actors -1"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, args, message):
    assert evaluate("--checkpoint", tmp_path, "--out", tmp_path / "o", *args) == 2
    assert message in capsys.readouterr().err


def test_best_of_an_unknown_sweep_is_a_clear_error(tmp_path, synth_shards, capsys):
    rc = evaluate(
        "--best-of",
        "my-sweep",
        "--sweep-storage",
        tmp_path,
        "--shards",
        synth_shards,
        "--out",
        tmp_path / "o",
    )
    assert rc == 2
    assert "no sweep 'my-sweep'" in capsys.readouterr().err

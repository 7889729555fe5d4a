"""`tensormask_ray.api`, called directly: each function's result object against the files it
wrote (the shards and manifest, the evaluation's detections and metrics, the test-dev files, the
overlays and detections of predict, the MLflow run), bad arguments refused before any work, and
the package re-exporting the API without importing Ray or torch. Training through the API is
tests/train/test_train_ray.py's fixture; sweeps, `compare`, `best_trial` and `best_of` are
tests/tune/test_tune_sweep.py's."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
from PIL import Image

from tensormask_ray import Execution, InferenceOptions, api
from tensormask_ray.config import ConfigError
from tensormask_ray.data.errors import DataError
from tensormask_ray.data.manifest import read_manifest
from tensormask_ray.errors import UserError
from tests.evaluation.checkpoints import make_checkpoint
from tests.fresh_process import not_loaded, run_python


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_shards):
    """A checkpoint in a training run's folder, its config naming an MLflow store, and the
    training run in that store."""
    from tensormask_ray.tracking import RunLogger

    root = tmp_path_factory.mktemp("api")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_dir = root / "runs" / "tiny"
    categories = read_manifest(synth_shards)["categories"]
    checkpoint = make_checkpoint(
        run_dir / "checkpoint_0000007", categories, **{"tracking.mlflow_uri": uri}
    )
    logger = RunLogger.create(uri, "tensormask-api-test", "tiny")
    logger.end()
    (run_dir / "mlflow_run_id").write_text(logger.run_id)
    return {"checkpoint": checkpoint, "uri": uri, "run_id": logger.run_id}


def test_the_package_exports_the_api_without_importing_ray_or_torch():
    heavy = not_loaded("ray", "torch", "mlflow")
    code = (
        "import tensormask_ray as t\n" + heavy + "from tensormask_ray import api\n"
        "assert all(getattr(t, n) is getattr(api, n) for n in api.__all__)\n"
        "assert t.evaluate is api.evaluate and t.api is api and t.TrainResult is api.TrainResult\n"
        + heavy
    )
    run_python(code)


def test_prepare_returns_the_shards_and_manifest_it_wrote(tmp_path, synth_coco):
    out = tmp_path / "shards"
    result = api.prepare(synth_coco.json, synth_coco.images_dir, out, shard_size=10, num_workers=1)
    shards = sorted(out.glob("shard-*.parquet"))
    assert result.out_dir == out and len(shards) == 3  # 24 images, 10 a shard
    assert result.manifest == json.loads((out / "manifest.json").read_text())
    assert (result.shards_written, result.shards_kept) == (3, 0)
    assert result.manifest["num_images"] == 24 and result.skipped == []
    again = api.prepare(synth_coco.json, synth_coco.images_dir, out, shard_size=10, num_workers=1)
    assert (again.shards_written, again.shards_kept) == (0, 3)


def test_made_and_merged_sets_are_where_the_result_says(tmp_path):
    made = api.make_synthetic(tmp_path / "s", 3, image_size=64, seed=1, style="plain")
    images = json.loads(made.json.read_text())["images"]
    assert len(images) == 3 and all((made.images_dir / i["file_name"]).is_file() for i in images)
    merged = api.merge([f"{made.json}*2"], tmp_path / "m")
    assert merged.json == tmp_path / "m" / "instances.json"
    merged_images = json.loads(merged.json.read_text())["images"]
    assert len(merged_images) == 6
    assert all((merged.images_dir / i["file_name"]).is_file() for i in merged_images)
    with pytest.raises(DataError, match="--num-images must be >= 1"):
        api.make_synthetic(tmp_path / "none", 0)


def test_evaluate_returns_the_metrics_and_files_it_wrote(tmp_path, trained, synth_shards):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "eval"
    result = api.evaluate(
        trained["checkpoint"],
        shards=synth_shards,
        output_dir=out,
        max_images=4,
        inference=InferenceOptions(score_thresh=0.0),
        execution=Execution(num_actors=0),
    )
    summary = json.loads((out / "metrics.json").read_text())
    detections = json.loads((out / "detections.json").read_text())
    assert result.files == (out / "detections.json", out / "metrics.json")
    assert result.output_dir == out and result.checkpoint == summary["checkpoint"]
    assert result.metrics == summary["metrics"] and set(result.metrics) >= {"segm/AP", "bbox/AP"}
    assert result.instances_found == summary["instances_found"]
    assert result.num_images == summary["num_images"] == 4
    assert result.num_detections == len(detections) == summary["num_detections"] > 0
    assert result.split == synth_shards.name and result.skipped_images == {}
    # logged under the checkpoint's training run, in the store its config names
    assert result.mlflow_run_id and result.mlflow_run_id == summary["mlflow_run_id"]
    assert result.mlflow_uri == trained["uri"]
    run = MlflowClient(trained["uri"]).get_run(result.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == trained["run_id"]
    assert run.data.metrics["eval/segm/AP"] == pytest.approx(max(result.metrics["segm/AP"], 0))
    assert run.data.metrics["eval/instances_found"] == result.instances_found["found"]

    quiet = api.evaluate(
        trained["checkpoint"],
        shards=synth_shards,
        output_dir=tmp_path / "quiet",
        max_images=4,
        inference=InferenceOptions(score_thresh=0.0),
        execution=Execution(num_actors=0),
        log_to_mlflow=False,
    )
    assert quiet.mlflow_run_id is None
    assert json.loads((tmp_path / "quiet" / "metrics.json").read_text())["mlflow_run_id"] is None
    assert quiet.metrics == result.metrics  # the same model on the same images


def test_evaluate_test_dev_returns_the_server_files(tmp_path, trained, synth_coco):
    coco = json.loads(synth_coco.json.read_text())
    info = tmp_path / "image_info.json"
    info.write_text(json.dumps({"images": coco["images"][:3], "categories": coco["categories"]}))
    out = tmp_path / "testdev"
    result = api.evaluate(
        trained["checkpoint"],
        split="test-dev",
        image_info=info,
        images_dir=synth_coco.images_dir,
        output_dir=out,
        name="tiny",
        inference=InferenceOptions(score_thresh=0.0),
        execution=Execution(num_actors=0),
        log_to_mlflow=False,
    )
    json_path, zip_path = result.files
    assert json_path == out / "detections_test-dev2017_tiny_results.json" and json_path.is_file()
    assert zip_path.is_file() and zipfile.ZipFile(zip_path).namelist() == [json_path.name]
    assert result.split == "test-dev" and result.metrics == {} and result.num_images == 3
    assert result.num_detections == len(json.loads(json_path.read_text())) > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "test-dev", "images_dir": "x"}, "--split test-dev needs --image-info"),
        ({}, "give the data as --shards DIR, or --coco-json FILE with --images-dir DIR"),
        (
            {"shards": "s", "inference": InferenceOptions(min_size=0)},
            "--min-size 0: must be a positive number of pixels",
        ),
        (
            {"shards": "s", "inference": InferenceOptions(topk_candidates=0)},
            "--topk 0: must be at least 1",
        ),
        ({"shards": "s", "execution": Execution(num_actors=-1)}, "--num-actors -1"),
        ({"shards": "s", "execution": Execution(device="tpu")}, "--device 'tpu'"),
    ],
)
def test_evaluate_refuses_bad_arguments_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        api.evaluate(tmp_path / "nothing", output_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_predict_returns_the_overlays_and_detections_it_wrote(tmp_path, trained, synth_coco):
    folder = tmp_path / "photos"
    folder.mkdir()
    files = sorted(synth_coco.images_dir.iterdir())
    shutil.copy(next(f for f in files if f.suffix == ".jpg"), folder / "street.jpg")
    shutil.copy(next(f for f in files if f.suffix == ".png"), folder / "field.png")
    (folder / "broken.jpg").write_bytes(b"GIF89a but not really")
    out = tmp_path / "overlays"
    result = api.predict(
        [folder],
        trained["checkpoint"],
        output_dir=out,
        inference=InferenceOptions(score_thresh=0.05),
    )
    # in input order (the folder sorted), the undecodable file skipped and named
    assert result.overlays == (out / "field.png", out / "street.png")
    assert list(result.skipped) == [str(folder / "broken.jpg")]
    written = json.loads((out / "detections.json").read_text())
    assert result.detections_file == out / "detections.json"
    assert list(result.detections) == written and len(written) == 3
    assert result.num_detections == sum(len(e.get("instances", ())) for e in written) > 0
    for entry, overlay in zip(written[1:], result.overlays):
        assert entry["overlay"] == str(overlay)
        assert Image.open(overlay).size == (entry["width"], entry["height"])
        assert all(i["score"] >= 0.05 for i in entry["instances"])
    with pytest.raises(UserError, match=r"--alpha 2\.0: must be in \[0, 1\]"):
        api.predict([folder], trained["checkpoint"], output_dir=tmp_path / "o", alpha=2.0)


def test_train_refuses_an_unknown_config_key_before_ray_starts(synth_shards):
    with pytest.raises(ConfigError, match="model.mask_haed"):
        api.train(
            preset="cpu-small",
            overrides=[f"data.train_shards={synth_shards}", "model.mask_haed=bipyramid"],
        )


def test_sweep_needs_a_spec_or_a_sweep_to_resume(tmp_path):
    with pytest.raises(UserError, match="give a sweep spec"):
        api.sweep()
    with pytest.raises(UserError, match="--resume NAME takes no spec or overrides"):
        api.sweep("sweeps/cpu/smoke.yaml", resume="old")
    with pytest.raises(UserError, match="no sweep 'missing'"):
        api.best_trial("missing", storage_path=str(tmp_path))

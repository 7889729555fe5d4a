"""Batch inference (batch_inference.py over image_sources.py, predictor.py and result_log.py):
Ray Data actors give the same detections as `predict_image` in one process, an undecodable image
becomes a record naming it, and an interrupted run resumes without redoing finished images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tensormask_ray.data.manifest import read_manifest
from tensormask_ray.errors import UserError
from tensormask_ray.evaluation.batch_inference import run_inference
from tensormask_ray.evaluation.coco import predictions_to_coco
from tensormask_ray.evaluation.evaluator import iter_shard_images, predict_image
from tensormask_ray.evaluation.image_sources import FileSource, ShardSource
from tensormask_ray.evaluation.options import Execution
from tensormask_ray.evaluation.predictor import ModelSpec
from tensormask_ray.evaluation.result_log import ResultLog, log_header

from .checkpoints import make_checkpoint

NUM_IMAGES = 8  # the first shard (6 images) and part of the second: the row filter is exercised


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synth_shards):
    categories = read_manifest(synth_shards)["categories"]
    folder = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_0000007", categories)
    spec = ModelSpec(str(folder), tuple(c["id"] for c in categories))
    model, cfg, _ = spec.load()
    images = dict(iter_shard_images(synth_shards, NUM_IMAGES))
    return spec, model, cfg, images


@pytest.fixture(scope="module")
def reference(setup):
    """Single-process, single-image inference: `predict_image` per image, one thread (as actors)."""
    spec, model, cfg, images = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            image_id: predictions_to_coco(
                predict_image(model, image, cfg), image_id, spec.category_ids
            )
            for image_id, image in images.items()
        }
    finally:
        torch.set_num_threads(threads)


def by_image(log: ResultLog) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for record in log.iter_records():
        assert not record["error"], record
        out[record["image_id"]] = record["results"]
    return out


def assert_same_detections(got: dict[int, list[dict]], want: dict[int, list[dict]]) -> None:
    assert sorted(got) == sorted(want)
    for image_id, results in want.items():
        assert results, "the test model should detect something"
        assert len(got[image_id]) == len(results), image_id
        for a, b in zip(got[image_id], results):
            assert a["category_id"] == b["category_id"]
            assert a["segmentation"] == b["segmentation"]  # identical RLEs
            # float32 boxes of ~100 px: another thread count sums the convolutions in another
            # order, a few ulps (~5e-5 px seen on AMD EPYC); a thousandth of a pixel is the same box
            np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-3)
            assert abs(a["score"] - b["score"]) <= 1e-5


def new_log(tmp_path, spec, cfg, source, **kw) -> ResultLog:
    return ResultLog(tmp_path / "predictions.jsonl", log_header(spec, cfg, source.describe()), **kw)


def test_in_process_path_equals_predict_image(tmp_path, setup, reference, synth_shards):
    spec, model, cfg, _ = setup
    source = ShardSource(synth_shards)
    with new_log(tmp_path, spec, cfg, source) as log:
        outcome = run_inference(
            source, spec, log, sorted(reference), execution=Execution(0), loaded=(model, cfg)
        )
        assert outcome.processed == NUM_IMAGES and outcome.resumed == 0 and not outcome.failures
        assert_same_detections(by_image(log), reference)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("num_actors", [1, 2])
def test_ray_actors_equal_single_process(
    tmp_path, ray_local, setup, reference, synth_shards, num_actors
):
    spec, _, cfg, _ = setup
    source = ShardSource(synth_shards)
    with new_log(tmp_path, spec, cfg, source) as log:
        outcome = run_inference(
            source, spec, log, sorted(reference), execution=Execution(num_actors, batch_size=3)
        )
        assert outcome.processed == NUM_IMAGES and not outcome.failures
        assert_same_detections(by_image(log), reference)


@pytest.mark.ray
@pytest.mark.slow
def test_image_folder_with_an_undecodable_file(tmp_path, ray_local, setup, reference, synth_coco):
    """Files read by the actors themselves; a broken file and a missing one become records that
    name them, the other images are unaffected; --strict stops at the first."""
    spec, _, cfg, _ = setup
    folder = tmp_path / "images"
    folder.mkdir()
    items = []
    for image_id in sorted(reference)[:3]:
        name = next(synth_coco.images_dir.glob(f"{image_id:012d}.*")).name
        shutil.copy(synth_coco.images_dir / name, folder / name)
        items.append((image_id, name, str(folder / name)))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    items += [
        (900, "broken.jpg", str(folder / "broken.jpg")),
        (901, "gone.png", str(folder / "gone.png")),
    ]
    source = FileSource(items, f"images {folder}")

    with new_log(tmp_path, spec, cfg, source) as log:
        outcome = run_inference(source, spec, log, execution=Execution(1, batch_size=2))
        assert outcome.done_ids == {i for i, _, _ in items[:3]}
        assert set(outcome.failures) == {900, 901}
        assert outcome.failures[900][0] == "broken.jpg" and "decode" in outcome.failures[900][1]
        assert outcome.failures[901][0] == "gone.png" and "no such file" in outcome.failures[901][1]
        good = {r["image_id"]: r["results"] for r in log.iter_records(outcome.done_ids)}
        assert_same_detections(good, {i: reference[i] for i in good})

    strict_log = ResultLog(tmp_path / "strict.jsonl", log.header)
    with strict_log, pytest.raises(UserError, match="broken.jpg"):
        run_inference(
            FileSource(items[3:4] + items[:1]),
            spec,
            strict_log,
            execution=Execution(0, strict=True),
        )


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_run_resumes_without_redoing_images(
    tmp_path, ray_local, setup, reference, synth_shards
):
    spec, _, cfg, _ = setup
    source = ShardSource(synth_shards)
    ids = sorted(reference)

    class Stop(Exception):
        pass

    def stop_after_three(record, seen=[]):  # noqa: B006 - a counter across calls
        seen.append(record["image_id"])
        if len(seen) == 3:
            raise Stop

    with new_log(tmp_path, spec, cfg, source) as log, pytest.raises(Stop):
        run_inference(
            source, spec, log, ids, execution=Execution(2, batch_size=1), on_record=stop_after_three
        )
    finished = {json.loads(line)["image_id"] for line in log.path.read_text().splitlines()[1:]}
    assert len(finished) == 3
    with log.path.open("a") as f:  # a kill in the middle of writing a line
        f.write(f'{{"image_id": {ids[-1]}, "file_name": "torn", "error": "", "res')

    seen = []
    seen_append = lambda r: seen.append(r["image_id"])  # noqa: E731
    with new_log(tmp_path, spec, cfg, source) as log:
        assert log.done_ids == finished
        outcome = run_inference(
            source, spec, log, ids, execution=Execution(2, batch_size=2), on_record=seen_append
        )
        assert outcome.resumed == 3 and outcome.processed == NUM_IMAGES - 3
        assert sorted(seen) == sorted(set(ids) - finished)  # nothing done twice
        assert_same_detections(by_image(log), reference)
    lines = log.path.read_text().splitlines()
    assert len(lines) == 1 + NUM_IMAGES  # the header and one line per image; the torn one is gone

    with new_log(tmp_path, spec, cfg, source) as log:  # a third run has nothing to do
        again = run_inference(source, spec, log, ids, execution=Execution(2))
        assert again.processed == 0 and again.resumed == NUM_IMAGES


def test_log_of_other_settings_is_refused(tmp_path, setup, synth_shards):
    spec, _, cfg, _ = setup
    source = ShardSource(synth_shards)
    with new_log(tmp_path, spec, cfg, source) as log:
        log.append({"image_id": 1, "file_name": "a.jpg", "height": 2, "width": 2, "error": "",
                    "seconds": 0.1, "results": "[]"})  # fmt: skip
    other = ModelSpec(spec.checkpoint, spec.category_ids, (("inference.score_thresh", 0.3),))
    cfg.inference.score_thresh, saved = 0.3, cfg.inference.score_thresh
    try:
        with pytest.raises(
            UserError, match=r"other settings \(different: inference\).*--overwrite"
        ):
            new_log(tmp_path, other, cfg, source)
        with new_log(tmp_path, other, cfg, source, overwrite=True) as log:
            assert log.done_ids == set()
    finally:
        cfg.inference.score_thresh = saved

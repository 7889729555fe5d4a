"""`tensormask-ray predict`: one overlay PNG per image showing its masks (checked pixel by pixel
against the detections written beside it), detections as JSON, undecodable files reported by
name and skipped (or fatal with --strict), and the same detections from Ray actors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tensormask_ray import cli
from tensormask_ray.data.manifest import CategoryMap, read_manifest
from tensormask_ray.data.transforms import decode_image
from tensormask_ray.evaluation.predict import record_to_prediction
from tensormask_ray.evaluation.visualize import draw_instances

from .checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synth_shards):
    categories = read_manifest(synth_shards)["categories"]
    return make_checkpoint(tmp_path_factory.mktemp("predict") / "checkpoint_0000007", categories)


@pytest.fixture
def inputs(tmp_path, synth_coco):
    """A folder with two images (a JPEG and a PNG) and a broken file, and one more image alone."""
    folder = tmp_path / "photos"
    folder.mkdir()
    files = sorted(synth_coco.images_dir.iterdir())
    jpeg = next(f for f in files if f.suffix == ".jpg")
    png = next(f for f in files if f.suffix == ".png")
    shutil.copy(jpeg, folder / "street.jpg")
    shutil.copy(png, folder / "field.png")
    (folder / "broken.jpg").write_bytes(b"GIF89a but not really")
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    single = tmp_path / "single.jpg"
    shutil.copy(files[2], single)
    return folder, single


def predict(*args) -> int:
    return cli.main(["predict", *map(str, args)])


def test_overlays_show_the_masks_and_the_bad_file_is_skipped(tmp_path, checkpoint, inputs, capsys):
    folder, single = inputs
    out = tmp_path / "out"
    rc = predict(folder, single, "--checkpoint", checkpoint, "--out", out, "--score-thresh", 0.12)
    assert rc == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.jpg" in captured.err
    assert sorted(p.name for p in out.glob("*.png")) == ["field.png", "single.png", "street.png"]

    entries = json.loads((out / "detections.json").read_text())
    assert [e["file"].rsplit("/", 1)[-1] for e in entries] == [
        "broken.jpg",
        "field.png",
        "street.jpg",
        "single.jpg",
    ]
    assert "decode" in entries[0]["error"]
    names = ["disk", "rectangle", "triangle", "ring"]
    drawn_any = False
    for entry in entries[1:]:
        assert all(i["score"] >= 0.12 and i["category_name"] in names for i in entry["instances"])
        image = decode_image(open(entry["file"], "rb").read())
        overlay = np.asarray(Image.open(entry["overlay"]).convert("RGB"))
        assert overlay.shape == image.shape
        prediction = record_to_prediction(
            entry["instances"], *image.shape[:2], CategoryMap((1, 3, 7, 12), tuple(names))
        )
        # The PNG is exactly these detections drawn over the image ...
        np.testing.assert_array_equal(
            overlay, draw_instances(image, prediction, names, score_thresh=0.12)
        )
        # ... and the masks show: (nearly) every pixel under a mask changed colour.
        union = prediction["masks"].any(axis=0)
        changed = (overlay != image).any(axis=-1)
        if union.any():
            drawn_any = True
            assert changed[union].mean() > 0.95
        else:
            assert not changed.any()
    assert drawn_any


def test_strict_stops_at_the_undecodable_file(tmp_path, checkpoint, inputs, capsys):
    folder, _ = inputs
    rc = predict(folder, "--checkpoint", checkpoint, "--out", tmp_path / "out", "--strict")
    assert rc == 2
    assert "broken.jpg: cannot read or decode the image" in capsys.readouterr().err


def test_missing_input_is_named(tmp_path, checkpoint, capsys):
    rc = predict(tmp_path / "nope.jpg", "--checkpoint", checkpoint, "--out", tmp_path / "out")
    assert rc == 2
    assert "nope.jpg: no such file or folder" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_ray_actors_write_the_same_detections(tmp_path, ray_local, checkpoint, inputs):
    folder, single = inputs
    common = [folder, single, "--checkpoint", checkpoint, "--score-thresh", 0.1]
    assert predict(*common, "--out", tmp_path / "local") == 0
    assert predict(*common, "--out", tmp_path / "ray", "--num-actors", 1, "--batch-size", 2) == 0

    def instances(out):
        return [e.get("instances") for e in json.loads((out / "detections.json").read_text())]

    local, ray = instances(tmp_path / "local"), instances(tmp_path / "ray")
    assert [r is None for r in ray] == [r is None for r in local]  # the same image failed
    for got, want in zip(ray, local):
        assert len(got or ()) == len(want or ())
        for a, b in zip(got or (), want or ()):
            assert (a["category_id"], a["segmentation"]) == (b["category_id"], b["segmentation"])
            assert abs(a["score"] - b["score"]) <= 1e-5
            # float32 px: the actor's one thread sums the convolutions in another order (a few ulps)
            np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-3)
    for name in ("field.png", "street.png", "single.png"):
        a = np.asarray(Image.open(tmp_path / "local" / name))
        b = np.asarray(Image.open(tmp_path / "ray" / name))
        np.testing.assert_array_equal(a, b)

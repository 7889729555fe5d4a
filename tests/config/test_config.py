import hashlib
import json

import pytest
import yaml

from tensormask_ray.config import (
    PATH_KEYS,
    Config,
    ConfigError,
    known_keys,
    load_config,
    parse_override,
    preset_names,
    preset_overrides,
)


def test_defaults_follow_the_paper():
    cfg = Config().validate()
    assert cfg.model.mask_head == "bipyramid"
    assert (cfg.model.min_level, cfg.model.max_level) == (2, 7)
    assert cfg.model.fpn_fuse == "avg"
    assert (cfg.loss.focal_gamma, cfg.loss.focal_alpha, cfg.loss.mask_fg_weight) == (3.0, 0.3, 1.5)
    assert (cfg.solver.base_lr, cfg.solver.reference_batch_size, cfg.solver.warmup_iters) == (
        0.02,
        16,
        1000,
    )
    assert cfg.input.min_size_train == [640, 800] and cfg.input.min_size_test == 800


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(
        overrides=[
            "model.mask_head=upscale_aligned",
            "model.window_sizes=[15,5]",
            "model.upscale_factor=5",
        ]
    )
    assert cfg.model.mask_head == "upscale_aligned"
    assert cfg.model.window_sizes == [15, 5]
    assert cfg.model.upscale_factor == 5.0 and isinstance(cfg.model.upscale_factor, float)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.mask_haed=bipyramid", "model.mask_haed"),
        ("modle.mask_head=bipyramid", "modle.mask_head"),
        ("model.backbone.detph=50", "model.backbone.detph"),
    ],
)
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.mask_head=fancy", "model.mask_head"),
        ("model.window_sizes=fifteen", "model.window_sizes"),
        ("solver.max_iter=1.5", "solver.max_iter"),
        ("train.use_gpu=3", "train.use_gpu"),
        ("model.backbone.depth=42", "model.backbone.depth"),
        ("model.upscale_factor=4", "model.upscale_factor"),  # 15 / 4 is not whole
    ],
)
def test_bad_value_is_named(override, key):
    if key == "model.upscale_factor":
        override = [override, "model.mask_head=upscale_aligned"]
    else:
        override = [override]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=override)


def test_yaml_round_trip_and_file_errors(tmp_path):
    cfg = load_config(preset="table2d-bipyramid-2win")
    path = tmp_path / "c.yaml"
    cfg.save(path)
    again = load_config(path)
    assert again == cfg
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"not_a_key": 1}}))
    with pytest.raises(ConfigError, match="model.not_a_key"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_paper_table_has_presets():
    names = set(preset_names())
    for prefix in ("table1-", "table2a-", "table2b-", "table2c-", "table2d-", "table3-"):
        assert any(n.startswith(prefix) for n in names), prefix
    for name in names:
        load_config(preset=name)  # all valid
    t2a = load_config(preset="table2a-aligned-l5")
    assert (t2a.model.mask_head, t2a.model.upscale_factor) == ("upscale_aligned", 5.0)
    assert load_config(preset="table2d-bipyramid-2win").model.window_sizes == [15, 11]
    assert load_config(preset="6x").solver.max_iter == 540000
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="table9")


# sha256 (first 20 hex digits) of json.dumps(sorted(overrides.items())) of each preset as it was
# written in config.py before the presets moved to tensormask_ray/configs/*.yaml (types count:
# 1.0 and 1 differ in JSON).
PRESET_FINGERPRINTS = {
    "table1-simple-natural": "081a89926e6874be90a7",
    "table1-simple-aligned": "8e684a01d13e7822f56f",
    "table2a-natural-l1.5": "8639a1376a8cf431e5c9",
    "table2a-natural-l3": "f0f4ffa2c1db7a5344d7",
    "table2a-natural-l5": "3d366d53552bb8cb78aa",
    "table2a-aligned-l1.5": "aab55202b86537d30007",
    "table2a-aligned-l3": "885850da68762af6a128",
    "table2a-aligned-l5": "7cf9356a566d75c10d7e",
    "table2b-nearest-l1.5": "d36dd6c86ccfe59f3be5",
    "table2b-nearest-l3": "7984566c3ddd0e118684",
    "table2b-nearest-l5": "21f1c1babe4c6ab4ee1f",
    "table2b-bilinear-l1.5": "aab55202b86537d30007",
    "table2b-bilinear-l3": "885850da68762af6a128",
    "table2b-bilinear-l5": "7cf9356a566d75c10d7e",
    "table2c-bipyramid": "7b396b0429fd49d5d474",
    "table2d-bipyramid-2win": "7bc70cc4a0391d06fa75",
    "table3-r50": "c1cd993c603c3cc5bcf1",
    "table3-r101": "471b1170c2e189c1faa9",
    "1x": "a1b7d55a7271e363dd76",
    "6x": "201d1c7f5fcd9a49bd33",
    "cpu-small": "945975b782f368a878b0",
    "d2-tensormask-r50-1x": "8b63101fb57520e189cb",
    "d2-tensormask-r50-6x": "ccf8dafb8e843545ad95",
}


def test_every_preset_yaml_loads_and_equals_the_preset_it_replaced():
    assert preset_names() == sorted(PRESET_FINGERPRINTS)
    for name, expected in PRESET_FINGERPRINTS.items():
        overrides = preset_overrides(name)
        text = json.dumps(sorted(overrides.items()))
        assert hashlib.sha256(text.encode()).hexdigest()[:20] == expected, name
        cfg = load_config(preset=name)  # valid, and every key lands
        assert {k: cfg.flat()[k] for k in overrides} == overrides, name
    # the table presets are the 6x schedule (paper §4.2); table2b-bilinear is table2a-aligned
    six = preset_overrides("6x")
    for name in preset_names():
        if name.startswith("table"):
            assert preset_overrides(name).items() >= six.items(), name
    assert preset_overrides("table2b-bilinear-l3") == preset_overrides("table2a-aligned-l3")


def test_a_preset_name_is_a_file_of_configs_only():
    for bad in ("../config", "cpu-small.yaml", ""):
        with pytest.raises(ConfigError, match="unknown preset"):
            preset_overrides(bad)


def test_detectron2_presets_are_its_configs():
    one, six = (
        load_config(preset="d2-tensormask-r50-1x"),
        load_config(preset="d2-tensormask-r50-6x"),
    )
    for cfg in (one, six):
        m = cfg.model
        assert (m.geometry, m.mask_head, m.window_sizes, m.min_level, m.max_level) == (
            "detectron2",
            "bipyramid",
            [11, 15],
            2,
            7,
        )
        assert (m.backbone.depth, m.backbone.stride_in_1x1, m.backbone.norm, m.fpn_fuse) == (
            50,
            True,
            "FrozenBN",
            "avg",
        )
        assert m.box_weights == [1.5, 1.5, 0.75, 0.75] and m.num_classes == 80
        assert (cfg.input.format, cfg.input.pixel_mean, cfg.input.pixel_std) == (
            "BGR255",
            [103.53, 116.28, 123.675],
            [1.0] * 3,
        )
        inf = cfg.inference
        assert (
            inf.score_thresh,
            inf.topk_candidates,
            inf.nms_thresh,
            inf.detections_per_image,
        ) == (0.05, 6000, 0.5, 100)
        assert (cfg.input.min_size_test, cfg.input.max_size_test) == (800, 1333)
        assert (cfg.solver.base_lr, cfg.solver.reference_batch_size) == (0.02, 16)
    assert (one.solver.max_iter, one.solver.steps, one.input.min_size_train) == (
        90000,
        [60000, 80000],
        [800, 800],
    )
    assert (six.solver.max_iter, six.solver.steps, six.input.min_size_train) == (
        540000,
        [480000, 520000],
        [640, 800],
    )
    assert Config().model.geometry == "paper" and Config().input.format == "RGB"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (
            {
                "model.geometry": "detectron2",
                "model.mask_head": "upscale_aligned",
                "model.upscale_factor": 1.5,
            },
            "model.mask_head",
        ),
        ({"model.geometry": "d2"}, "model.geometry"),
        (
            {"model.backbone.stride_in_1x1": True, "model.backbone.depth": 18},
            "model.backbone.stride_in_1x1",
        ),
        (
            {"model.backbone.stride_in_1x1": True, "model.backbone.weights": "resnet50.pth"},
            "model.backbone.weights",
        ),
        ({"model.weights": "ckpt", "model.backbone.weights": "resnet50.pth"}, "model.weights"),
        ({"model.box_weights": [1.5, 1.5, 0.75]}, "model.box_weights"),
        ({"model.box_weights": [1.0, 0.0, 1.0, 1.0]}, "model.box_weights"),
        ({"input.format": "BGR255"}, "input.pixel_mean"),  # 0-1 means with 0-255 pixels
        (
            {"input.pixel_mean": [103.5, 116.3, 123.7]},
            "input.pixel_mean",
        ),  # 0-255 means with RGB 0-1
        ({"input.format": "BGR"}, "input.format"),
        ({"input.pixel_std": [1.0, 0.0, 1.0]}, "input.pixel_std"),
    ],
)
def test_detectron2_keys_reject_nonsense(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_path_keys_are_the_config_keys_that_hold_paths():
    """One list (sweeps make these absolute, cluster jobs warn when they are relative): every entry
    a real key, and every key named like a path (…_shards, …_json, ….weights, …_path) on it."""
    keys = known_keys()
    assert set(PATH_KEYS) <= set(keys)
    named_like_paths = {k for k in keys if k.endswith(("_shards", "_json", ".weights", "_path"))}
    assert named_like_paths == set(PATH_KEYS)

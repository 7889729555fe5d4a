import pytest
import yaml

from tensormask_ray.config import PRESETS, Config, ConfigError, load_config, parse_override


def test_defaults_follow_the_paper():
    cfg = Config().validate()
    assert cfg.model.mask_head == "bipyramid"
    assert (cfg.model.min_level, cfg.model.max_level) == (2, 7)
    assert cfg.model.fpn_fuse == "avg"
    assert (cfg.loss.focal_gamma, cfg.loss.focal_alpha, cfg.loss.mask_fg_weight) == (3.0, 0.3, 1.5)
    assert (cfg.solver.base_lr, cfg.solver.reference_batch_size, cfg.solver.warmup_iters) == (0.02, 16, 1000)
    assert cfg.input.min_size_train == [640, 800] and cfg.input.min_size_test == 800


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(overrides=["model.mask_head=upscale_aligned", "model.window_sizes=[15,5]", "model.upscale_factor=5"])
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
    names = set(PRESETS)
    for prefix in ("table1-", "table2a-", "table2b-", "table2c-", "table2d-", "table3-"):
        assert any(n.startswith(prefix) for n in names), prefix
    for name in PRESETS:
        load_config(preset=name)  # all valid
    t2a = load_config(preset="table2a-aligned-l5")
    assert (t2a.model.mask_head, t2a.model.upscale_factor) == ("upscale_aligned", 5.0)
    assert load_config(preset="table2d-bipyramid-2win").model.window_sizes == [15, 11]
    assert load_config(preset="6x").solver.max_iter == 540000
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="table9")

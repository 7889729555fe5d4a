"""`convert detectron2`: every key of a Detectron2 TensorMask checkpoint is accounted for, bad
checkpoints are refused naming what is wrong, and a pickle naming anything but numpy arrays is
refused without running it. The end-to-end parity of a converted checkpoint is in
tests/modeling/test_detectron2_parity.py."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from tensormask_ray.cli import main as cli_main
from tensormask_ray.config import load_config
from tensormask_ray.convert.detectron2 import (
    convert_state_dict,
    detectron2_name,
    read_detectron2_checkpoint,
)
from tensormask_ray.convert.safe_pickle import UnsafePickleError
from tensormask_ray.errors import UserError
from tensormask_ray.modeling import build_model
from tests.detectron2_checkpoint import to_detectron2_arrays, write_pkl
from tests.detectron2_reference import ANCHOR_SIZES
from tests.detectron2_reference import TensorMask as Reference


@pytest.fixture(scope="module")
def cfg():
    return load_config(preset="d2-tensormask-r50-1x")


@pytest.fixture(scope="module")
def arrays():
    """Detectron2's keys and shapes (the reference's state_dict, default init)."""
    torch.manual_seed(0)
    return to_detectron2_arrays(Reference())


@pytest.fixture(scope="module")
def own(cfg):
    return build_model(cfg).state_dict()


def test_every_key_maps_one_to_one(arrays, cfg, own):
    state = convert_state_dict(arrays, cfg, own)
    assert set(state) == set(own)
    names = {detectron2_name(k, cfg) for k in own}
    assert names == set(arrays)  # a bijection onto Detectron2's keys
    for ours, theirs in [
        ("backbone.stem.0.weight", "backbone.bottom_up.stem.conv1.weight"),
        ("backbone.stem.1.running_var", "backbone.bottom_up.stem.conv1.norm.running_var"),
        ("backbone.res3.0.downsample.1.bias", "backbone.bottom_up.res3.0.shortcut.norm.bias"),
        ("backbone.res5.2.bn3.weight", "backbone.bottom_up.res5.2.conv3.norm.weight"),
        ("fpn.lateral.0.weight", "backbone.fpn_lateral2.weight"),
        ("fpn.output.3.bias", "backbone.fpn_output5.bias"),
        ("fpn.p6.weight", "backbone.top_block.p6.weight"),
        ("head.cls_tower.6.weight", "head.cls_subnet.6.weight"),
        ("head.box_pred.bias", "head.bbox_pred.bias"),
        ("head.mask_preds.0.weight", "head.mask_pred_11.weight"),
        ("head.mask_preds.1.bias", "head.mask_pred_15.bias"),
        ("head.bipyramid.fuse.0.weight", "head.mask_fuse.0.weight"),
    ]:
        assert detectron2_name(ours, cfg) == theirs
        assert torch.equal(state[ours], torch.from_numpy(arrays[theirs]))


def test_missing_extra_and_misshaped_keys_are_all_named(arrays, cfg, own):
    bad = dict(arrays)
    del bad["head.cls_score.bias"]
    del bad["backbone.bottom_up.res4.5.conv2.weight"]
    bad["head.extra_conv.weight"] = np.zeros((3, 3), np.float32)
    bad["backbone.fpn_output3.weight"] = np.zeros((256, 256, 1, 1), np.float32)
    with pytest.raises(UserError) as e:
        convert_state_dict(bad, cfg, own)
    msg = str(e.value)
    for name in ("head.cls_score.bias", "backbone.bottom_up.res4.5.conv2.weight", "head.extra_conv.weight",
                 "backbone.fpn_output3.weight: file (256, 256, 1, 1) vs model (256, 256, 3, 3)"):  # fmt: skip
        assert name in msg
    assert "missing keys (2)" in msg and "map to nothing in this model (1)" in msg


def test_window_sizes_must_be_the_checkpoints_in_its_order(arrays):
    """[15, 11] has the right shapes but would read the class scores of the 11-cell windows as
    those of the 15-cell ones: refused; [13, 15] has no mask_pred_13."""
    swapped = load_config(preset="d2-tensormask-r50-1x", overrides={"model.window_sizes": [15, 11]})
    with pytest.raises(UserError, match=r"order \[11, 15\].*model\.window_sizes=\[11, 15\]"):
        convert_state_dict(arrays, swapped, build_model(swapped).state_dict())
    other = load_config(preset="d2-tensormask-r50-1x", overrides={"model.window_sizes": [13, 15]})
    with pytest.raises(UserError, match=r"missing keys .*head\.mask_pred_13\.weight"):
        convert_state_dict(arrays, other, build_model(other).state_dict())


def test_tolerated_buffers_are_checked_not_loaded(arrays, cfg, own):
    extra = dict(arrays)
    extra["pixel_mean"] = np.array([103.530, 116.280, 123.675], np.float32).reshape(3, 1, 1)
    extra["pixel_std"] = np.ones((3, 1, 1), np.float32)
    for level, sizes in enumerate(ANCHOR_SIZES):  # old checkpoints stored the cell anchors
        extra[f"anchor_generator.cell_anchors.{level}"] = np.array(
            [[-s / 2, -s / 2, s / 2, s / 2] for s in sizes], np.float32
        )
    assert set(convert_state_dict(extra, cfg, own)) == set(own)
    extra["anchor_generator.cell_anchors.1"] = extra["anchor_generator.cell_anchors.1"][::-1].copy()
    extra["pixel_mean"] = np.array([0.485, 0.456, 0.406], np.float32)
    with pytest.raises(UserError) as e:
        convert_state_dict(extra, cfg, own)
    assert "'anchor_generator.cell_anchors.1'" in str(e.value) and "'pixel_mean'" in str(e.value)


def test_frozen_bn_without_statistics_loads_as_identity(arrays, cfg, own):
    """Detectron2's FrozenBatchNorm2d fills running_mean/var of pre-v2 checkpoints with 0 and 1."""
    old = {k: v for k, v in arrays.items() if not k.endswith(("running_mean", "running_var"))}
    state = convert_state_dict(old, cfg, own)
    assert torch.equal(state["backbone.res2.0.bn1.running_mean"], torch.zeros(64))
    assert torch.equal(state["backbone.stem.1.running_var"], torch.ones(64))
    assert torch.equal(
        state["backbone.stem.1.weight"],
        torch.from_numpy(arrays["backbone.bottom_up.stem.conv1.norm.weight"]),
    )


def test_pkl_and_pth_read_the_same(tmp_path, arrays):
    for protocol in (2, 5):
        got = read_detectron2_checkpoint(write_pkl(arrays, tmp_path / f"p{protocol}.pkl", protocol))
        assert set(got) == set(arrays) and all(np.array_equal(got[k], arrays[k]) for k in arrays)
    torch.save(
        {"model": {k: torch.from_numpy(v) for k, v in arrays.items()}, "iteration": 9},
        tmp_path / "m.pth",
    )
    got = read_detectron2_checkpoint(tmp_path / "m.pth")
    assert set(got) == set(arrays) and all(
        torch.equal(got[k], torch.from_numpy(arrays[k])) for k in arrays
    )


def test_a_pickle_naming_os_system_is_refused_and_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    # GLOBAL 'os system', MARK, a string, TUPLE, REDUCE: os.system("touch <marker>") when unpickled
    evil = tmp_path / "model_final.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"refused to load 'os\.system'"):
        read_detectron2_checkpoint(evil)
    assert not marker.exists()
    # the same through the command line: a clean error, exit status 2, nothing run
    assert cli_main(["convert", "detectron2", str(evil), "--out", str(tmp_path / "out")]) == 2
    assert "os.system" in capsys.readouterr().err and not marker.exists()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    sneaky = tmp_path / "sneaky.pkl"
    sneaky.write_bytes(pickle.dumps({"model": {"x": Payload()}, "__author__": "?"}, protocol=4))
    with pytest.raises(UnsafePickleError, match=r"refused to load '(posix|os|nt)\.system'"):
        read_detectron2_checkpoint(sneaky)
    assert not marker.exists()


def test_object_arrays_and_caffe2_blobs_are_refused(tmp_path):
    objects = tmp_path / "objects.pkl"
    write_pkl({"w": np.array([1, "a"], dtype=object)}, objects)
    with pytest.raises(UnsafePickleError, match="object array"):
        read_detectron2_checkpoint(objects)
    blobs = tmp_path / "R-50.pkl"
    blobs.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.zeros(3, np.float32)}}, protocol=2))
    with pytest.raises(UserError, match="not a Detectron2 model file"):
        read_detectron2_checkpoint(blobs)

"""Mask quality at the ground-truth windows (evaluation/window_masks.py): exact IoUs for masks
whose answer is known, crowd regions left out, the size buckets, and the `evaluate` flag."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tensormask_ray import cli
from tensormask_ray.config import load_config
from tensormask_ray.evaluation.window_masks import summarize, window_mask_ious
from tensormask_ray.modeling import build_model

from .checkpoints import make_checkpoint


def _model(head: str, geometry: str = "paper"):
    cfg = load_config(preset="cpu-small", overrides={
        "model.num_classes": 2, "model.min_level": 2, "model.window_sizes": [15], "model.mask_head": head,
        "model.upscale_factor": 1.5 if head.startswith("upscale") else 1.0, "model.geometry": geometry,
    })  # fmt: skip
    torch.manual_seed(0)
    return build_model(cfg)


def _square_image():
    """A 128 x 128 image with a 40 x 40 square at [44, 84) x [44, 84) and a crowd region."""
    masks = torch.zeros(2, 128, 128, dtype=torch.uint8)
    masks[0, 44:84, 44:84] = 1
    masks[1, 4:20, 4:20] = 1
    target = {
        "boxes": torch.tensor([[44.0, 44.0, 84.0, 84.0], [4.0, 4.0, 20.0, 20.0]]),
        "labels": torch.tensor([0, 1]),
        "masks": masks,
        "iscrowd": torch.tensor([False, True]),
    }
    return torch.randn(1, 3, 128, 128), [target], [(128, 128)]


@pytest.mark.parametrize("head", ["upscale_aligned", "bipyramid"])
@pytest.mark.parametrize("fill, expected", [(1.0, 40 * 40 / (60 * 60)), (0.0, 0.0)])
def test_known_masks_give_their_exact_iou(monkeypatch, head, fill, expected):
    """Every positive window of the square is a 15 x 15 window of P2 (60 x 60 px, containing the
    square): a mask of all ones pastes as the whole window, so its IoU is 40^2 / 60^2; all zeros, 0."""
    model = _model(head)

    def decode(masks, group, ys, xs, image, dense=False):
        return [torch.full(model.groups[g].op.out_size, fill) for g in group.tolist()]

    monkeypatch.setattr(model, "decode_masks", decode)
    (ious,) = window_mask_ious(model, *_square_image())
    assert ious[0].item() == pytest.approx(expected, abs=2e-3)  # up to a few pixels of pasting
    assert math.isnan(ious[1].item())  # the crowd region is not scored
    assert model.training  # the model's mode is given back


def test_detectron2_geometry_scores_at_its_windows(monkeypatch):
    """Detectron2's windows: centres at multiples of 4, boxes [c - 30, c + 30). The square's
    positives are the P2 windows centred at (64, 64), (60, 64), (68, 64), (64, 60), (64, 68); a mask
    of ones in its left 7 of 15 columns pastes as [cx - 30, cx - 2) x [cy - 30, cy + 30) less its
    four corner pixels (bilinear 0.625^2 < 0.5): 1676 px, whose IoU with the 1600-px square is
    720/2556 at cx = 64, 560/2716 at 60 and 880/2396 at 68."""
    model = _model("bipyramid", "detectron2")

    def decode(masks, group, ys, xs, image, dense=False):
        out = []
        for g in group.tolist():
            m = torch.zeros(model.groups[g].op.out_size)
            m[:, :7] = 1.0
            out.append(m)
        return out

    monkeypatch.setattr(model, "decode_masks", decode)
    (ious,) = window_mask_ious(model, *_square_image())
    expected = (3 * 720 / 2556 + 560 / 2716 + 880 / 2396) / 5
    assert ious[0].item() == pytest.approx(expected, abs=1e-6)
    assert math.isnan(ious[1].item())  # dropped as Detectron2 drops crowd regions, and not scored


def test_the_real_decoder_scores_as_the_dense_decode_does(monkeypatch):
    """With the model's own (sparse, lazy) decoder, the IoUs equal those of decoding the whole
    head tensor densely and picking the same windows."""
    model = _model("bipyramid").eval()
    inputs = _square_image()
    (ious,) = window_mask_ious(model, *inputs)
    assert math.isnan(ious[1].item()) and not model.training
    sparse_decode = model.decode_masks
    monkeypatch.setattr(
        model, "decode_masks", lambda *a, dense=False: sparse_decode(*a, dense=True)
    )
    (dense_ious,) = window_mask_ious(model, *inputs)
    assert 0.0 < ious[0].item() < 1.0  # a random model: neither empty nor perfect masks
    assert ious[0].item() == pytest.approx(dense_ious[0].item(), abs=1e-6)


def test_summary_buckets_by_coco_size_and_counts_the_unscored():
    ious = np.array([0.9, 0.6, 0.4, np.nan, np.nan])
    areas = np.array([20.0**2, 50.0**2, 120.0**2, 60.0**2, 10.0**2])
    crowd = np.array([False, False, False, False, True])
    s = summarize(ious, areas, crowd)
    assert s["instances"] == 4 and s["unassigned"] == 1
    assert s["IoU"] == pytest.approx(100 * (0.9 + 0.6 + 0.4) / 3)
    assert (s["IoU_S"], s["IoU_M"], s["IoU_L"]) == pytest.approx((90.0, 60.0, 40.0))
    assert s["IoU>=0.5"] == pytest.approx(200 / 3) and s["IoU>=0.75"] == pytest.approx(100 / 3)
    assert (
        summarize(np.array([0.5]), np.array([10.0]), np.array([False]))["IoU_L"] == -1.0
    )  # no large instance


def test_evaluate_writes_the_window_mask_figures(tmp_path, synth_shards, capsys):
    from tensormask_ray.data.manifest import read_manifest

    ckpt = make_checkpoint(
        tmp_path / "run" / "checkpoint_0000003", read_manifest(synth_shards)["categories"]
    )
    rc = cli.main(["evaluate", "--checkpoint", str(ckpt), "--shards", str(synth_shards), "--out", str(tmp_path / "o"),
                   "--max-images", "3", "--num-actors", "0", "--no-mlflow", "--window-masks"])  # fmt: skip
    assert rc == 0
    assert "positive windows (the mask head alone)" in capsys.readouterr().out
    figures = json.loads((tmp_path / "o" / "metrics.json").read_text())["window_masks"]
    assert {
        "IoU",
        "IoU_S",
        "IoU_M",
        "IoU_L",
        "IoU>=0.5",
        "IoU>=0.75",
        "instances",
        "unassigned",
    } == set(figures)
    # the figures of this checkpoint on the first 3 images at its test size, every non-crowd
    # instance of them counted
    from tensormask_ray.data.manifest import shard_paths
    from tensormask_ray.evaluation.window_masks import evaluate_window_masks
    from tensormask_ray.train.checkpoint import load_model_for_inference

    model, cfg, _ = load_model_for_inference(ckpt)
    assert figures == pytest.approx(evaluate_window_masks(model, synth_shards, cfg, max_images=3))
    manifest = read_manifest(synth_shards)
    rows = pq.read_table(shard_paths(synth_shards, manifest)[0], columns=["iscrowd"]).to_pylist()
    assert figures["instances"] == sum(not c for row in rows[:3] for c in row["iscrowd"]) > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--coco-json", "c.json", "--images-dir", "d"], "--window-masks needs --shards DIR"),
        (
            ["--split", "test-dev", "--image-info", "i.json", "--shards", "s"],
            "not with --split test-dev",
        ),
    ],
)
def test_window_masks_without_shards_is_refused(tmp_path, capsys, args, message):
    assert (
        cli.main(
            [
                "evaluate",
                "--checkpoint",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--window-masks",
                *args,
            ]
        )
        == 2
    )
    assert message in capsys.readouterr().err

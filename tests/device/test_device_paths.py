"""Every path that runs the model takes its device from the model (or the config that placed it),
never a default: each is driven here with the model on the stand-in accelerator (stand_in.py),
where a tensor left on the CPU fails as it would on a GPU, and gives what it gives on the CPU.

Paths: the training step and validation (the per-worker loop, through `LocalContext`), evaluate
and batch inference (`run_inference` in process: `Predictor` -> `predict_image`, what `evaluate`
and `predict` run), the window-mask evaluation, the sparse window decoder and the lazy bipyramid
(inference of the bipyramid head decodes through it)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tensormask_ray.data.local import shard_batches
from tensormask_ray.data.manifest import read_manifest
from tensormask_ray.evaluation.batch_inference import run_inference
from tensormask_ray.evaluation.image_sources import ShardSource
from tensormask_ray.evaluation.options import Execution
from tensormask_ray.evaluation.predictor import ModelSpec
from tensormask_ray.evaluation.result_log import ResultLog
from tensormask_ray.evaluation.validation import validate_on_shards
from tensormask_ray.evaluation.window_masks import evaluate_window_masks
from tensormask_ray.modeling.window_op import WindowOp, decode_windows
from tensormask_ray.train.checkpoint import load_model_for_inference
from tensormask_ray.train.context import LocalContext
from tensormask_ray.train.loop import RunSettings, run_training_loop

from ..evaluation.checkpoints import make_checkpoint, tiny_config
from .stand_in import StandIn, stand_in_device

NUM_IMAGES = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synth_shards):
    categories = read_manifest(synth_shards)["categories"]
    return make_checkpoint(tmp_path_factory.mktemp("device_ckpt"), categories), [
        c["id"] for c in categories
    ]


def test_training_step_and_validation_run_on_the_models_device(tmp_path, synth_shards):
    cfg = tiny_config(
        4,
        **{
            "input.min_size_train": [64, 80],
            "input.max_size_train": 96,
            "solver.max_iter": 2,
            "solver.warmup_iters": 1,
            "train.checkpoint_period": 1,
            "data.max_val_images": NUM_IMAGES,
        },
    )
    run = RunSettings(
        run_dir=str(tmp_path), checkpoint_metric="val/segm/AP", val_shards=str(synth_shards)
    )
    with stand_in_device() as device:
        ctx = LocalContext(device, shard_batches(synth_shards, cfg), tmp_path)
        last = run_training_loop(cfg, ctx, run, validation=validate_on_shards)
    assert [r["iteration"] for r in ctx.reports] == [1, 2]
    assert math.isfinite(last["train/loss"])
    # eval_period 0: validation at the end only (the first report carries no AP yet)
    assert ctx.reports[0]["val/segm/AP"] == -math.inf
    assert 0.0 <= last["val/segm/AP"] <= 1.0 and "val/bbox/AP" in last
    assert (tmp_path / "checkpoint_0000002" / "state.pt").is_file()


def _infer(folder, category_ids, shards, out, device):
    """`evaluate --num-actors 0` / `predict --num-actors 0`: load on the device, infer in process."""
    spec = ModelSpec(str(folder), tuple(category_ids), device=str(device))
    model, cfg, _ = spec.load()
    source = ShardSource(shards)
    with ResultLog(out / "predictions.jsonl", {"device": str(device)}) as log:
        outcome = run_inference(
            source,
            spec,
            log,
            source.image_ids()[:NUM_IMAGES],
            execution=Execution(0),
            loaded=(model, cfg),
        )
    return model, outcome


def test_evaluate_and_batch_inference_run_on_the_models_device(tmp_path, checkpoint, synth_shards):
    folder, category_ids = checkpoint
    with stand_in_device() as device:
        model, on_device = _infer(folder, category_ids, synth_shards, tmp_path / "device", device)
        assert all(isinstance(p, StandIn) for p in model.parameters())
    _, on_cpu = _infer(folder, category_ids, synth_shards, tmp_path / "cpu", "cpu")
    assert on_device.done_ids == on_cpu.done_ids and len(on_cpu.done_ids) == NUM_IMAGES
    lines = [
        [
            json.loads(line)
            for line in (tmp_path / where / "predictions.jsonl").read_text().splitlines()[1:]
        ]
        for where in ("device", "cpu")
    ]
    detections = [[(r["image_id"], r["results"]) for r in records] for records in lines]
    assert detections[0] == detections[1]  # the same computation, only the device differs
    assert all(results for _, results in detections[0])  # masks were decoded (lazy bipyramid)


def test_window_mask_evaluation_runs_on_the_models_device(checkpoint, synth_shards):
    folder, _ = checkpoint
    model, cfg, _ = load_model_for_inference(folder)
    on_cpu = evaluate_window_masks(model, synth_shards, cfg, NUM_IMAGES)
    with stand_in_device() as device:
        model.to(device)
        on_device = evaluate_window_masks(model, synth_shards, cfg, NUM_IMAGES)
    assert on_device == on_cpu


@pytest.mark.parametrize(
    "op, shape",
    [
        (WindowOp((5, 5), natural=True), (1, 5, 5, 6, 7)),  # natural
        (WindowOp((5, 5), alpha=1), (1, 5, 5, 6, 7)),  # aligned: align2nat
        (WindowOp((6, 6), alpha=1), (1, 3, 3, 6, 7)),  # up_align2nat
        (WindowOp((6, 6), alpha=1, stride=2), (1, 3, 3, 6, 7)),  # swap_align2nat
    ],
)
def test_sparse_window_decoder_runs_on_the_inputs_device(op, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    Ho, Wo = -(-shape[3] // op.stride), -(-shape[4] // op.stride)
    ys, xs = torch.tensor([0, Ho - 1, 2]), torch.tensor([Wo - 1, 0, 1])
    batch = torch.zeros(3, dtype=torch.long)
    expected = decode_windows(x, op, batch, ys, xs, -6.0)
    expected_dense = op.dense(x, -6.0)[batch, :, :, ys, xs]
    with stand_in_device() as device:
        got = decode_windows(x.to(device), op, batch.to(device), ys.to(device), xs.to(device), -6.0)
        dense = op.dense(x.to(device), -6.0)[batch.to(device), :, :, ys.to(device), xs.to(device)]
        assert isinstance(got, StandIn) and isinstance(dense, StandIn)
        got, dense = got.cpu(), dense.cpu()
    assert torch.equal(got, expected) and torch.equal(dense, expected_dense)

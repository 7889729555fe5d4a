"""In-process evaluation of a model on a folder of shards: decode, resize for test, predict, COCO
mask and box AP. Used for periodic validation during training, where each rank predicts its own
slice of the images (`predict_shards(..., rank, world_size)`) and rank 0 scores them all
(`score_predictions`); `tensormask-ray evaluate` scales the same per-image work out with Ray Data
(batch_inference.py). The model runs on the device its parameters are on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ..config import Config
from ..data import schema
from ..data.manifest import CategoryMap, read_manifest
from ..data.transforms import decode_image, pad_images, preprocess_for_test
from .coco import evaluate_coco, predictions_to_coco
from .ground_truth import coco_gt_from_shards


def iter_shard_images(
    shards_dir: str | Path, max_images: int = 0, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[int, np.ndarray]]:
    """(image_id, RGB uint8 (H, W, 3)) for the images of a shards folder, in manifest order:
    the first `max_images` (0: all), and of those only every `world_size`-th from `rank` on
    (image i belongs to rank i % world_size; the others are not decoded)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    manifest = read_manifest(shards_dir)
    seen = 0
    for shard in manifest["shards"]:
        table = pq.read_table(Path(shards_dir) / shard["file"], columns=["image_id", "image_bytes"])
        for image_id, data in zip(
            table.column("image_id").to_pylist(), table.column("image_bytes").to_pylist()
        ):
            if seen % world_size == rank:
                yield int(image_id), decode_image(data)
            seen += 1
            if max_images and seen >= max_images:
                return


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are: the device its inputs must be on."""
    return next(model.parameters()).device


@torch.no_grad()
def predict_image(model, image: np.ndarray, cfg: Config) -> dict:
    """One RGB uint8 image -> predictions at its own resolution (boxes, scores, labels, masks),
    on the CPU. The image is run on the model's device."""
    tensor, _ = preprocess_for_test(image, cfg.input)  # (3, h, w) normalised
    _, h, w = tensor.shape
    batch = pad_images([tensor], cfg.input.size_divisibility)  # (1, 3, H, W)
    was_training = model.training
    model.eval()
    out = model(
        batch.to(model_device(model)), image_sizes=[(h, w)], output_sizes=[image.shape[:2]]
    )[0]
    model.train(was_training)
    return {k: v.cpu() for k, v in out.items()}


def predict_shards(
    model,
    shards_dir: str | Path,
    cfg: Config,
    max_images: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[list[dict], list[int]]:
    """COCO result dicts and the image ids predicted, for this rank's slice of the shards'
    images (see `iter_shard_images`)."""
    category_ids = CategoryMap.from_manifest(read_manifest(shards_dir)).ids
    results, image_ids = [], []
    for image_id, image in iter_shard_images(shards_dir, max_images, rank, world_size):
        results.extend(
            predictions_to_coco(predict_image(model, image, cfg), image_id, category_ids)
        )
        image_ids.append(image_id)
    return results, image_ids


def score_predictions(
    shards_dir: str | Path, results: list[dict], image_ids: list[int]
) -> dict[str, float]:
    """COCO segm/bbox AP of the results on the given images of the shards."""
    return evaluate_coco(coco_gt_from_shards(shards_dir), results, image_ids=image_ids)


def evaluate_model(
    model, shards_dir: str | Path, cfg: Config, max_images: int = 0
) -> dict[str, float]:
    """COCO segm/bbox AP of `model` on the shards (optionally the first `max_images` only), in
    this process."""
    return score_predictions(shards_dir, *predict_shards(model, shards_dir, cfg, max_images))


OVERLAY_SCORE = 0.3  # detections drawn on validation overlays


def overlay_images(
    model, shards_dir: str | Path, cfg: Config, num_images: int, max_images: int = 0
) -> list[tuple[str, np.ndarray]]:
    """(name, (H, 2W + gap, 3) uint8) for `num_images` images spread evenly over the shards (the
    first `max_images` of them when given): ground truth left, the model's prediction right
    (score >= OVERLAY_SCORE), named by their file name without its extension."""
    from .ground_truth import instances_from_coco
    from .visualize import draw_instances, side_by_side

    if num_images <= 0:
        return []
    manifest = read_manifest(shards_dir)
    total = min(max_images or manifest["num_images"], manifest["num_images"])
    wanted = {
        round(i * (total - 1) / max(num_images - 1, 1)) for i in range(min(num_images, total))
    }
    categories = CategoryMap.from_manifest(manifest)
    class_names = list(categories.names)
    coco_gt = coco_gt_from_shards(shards_dir)
    out = []
    for index, (image_id, image) in enumerate(iter_shard_images(shards_dir, total)):
        if index not in wanted:
            continue
        truth = instances_from_coco(coco_gt, image_id, categories)
        prediction = predict_image(model, image, cfg)
        drawn = side_by_side(
            draw_instances(image, truth, class_names),
            draw_instances(image, prediction, class_names, score_thresh=OVERLAY_SCORE),
        )
        out.append((Path(coco_gt.imgs[image_id]["file_name"]).stem, drawn))
    return out


__all__ = [
    "evaluate_model",
    "iter_shard_images",
    "model_device",
    "overlay_images",
    "predict_image",
    "predict_shards",
    "schema",
    "score_predictions",
]

"""Mask quality at the ground-truth windows: the mask head judged on its own.

COCO mask AP scores the whole detector: which windows the class branch ranks first, what NMS
keeps, and then their masks. Between models whose class and box branches trained differently
(small data, a few hundred iterations from random weights) it mostly measures those branches. This
module measures the masks alone. For every non-crowd ground-truth instance it takes the windows
that the label assignment (§4.2) makes positive for it, decodes the masks the head predicts there
(sparsely, as inference does), pastes each into the image as inference pastes a detection's mask,
and compares it with the instance's mask:

    IoU of an instance = mean over its positive windows of IoU(pasted mask > 0.5, ground truth)

reported overall, by COCO size (small < 32^2 <= medium < 96^2 <= large, area in the original
image's pixels) and as the fractions of instances at IoU >= 0.5 and >= 0.75. Instances that no
window is assigned to (possible under the containment rule) are counted apart, not scored.

`tensormask-ray evaluate ... --window-masks` adds these figures to metrics.json; the Table 2
ablations (docs/ablations.md) read them beside mask AP.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ..config import Config
from ..data.manifest import CategoryMap, read_manifest, shard_paths
from ..modeling.assignment import assign_windows
from ..modeling.postprocess import paste_masks
from ..modeling.windows import locate_windows

SMALL, LARGE = 32**2, 96**2  # COCO's area ranges
PASTE_CHUNK = 64  # windows pasted at once (bounds memory at COCO image sizes)


@torch.no_grad()
def window_mask_ious(
    model, images: torch.Tensor, targets: list[dict], image_sizes: list[tuple[int, int]]
) -> list[torch.Tensor]:
    """images (N, 3, H, W), padded to the size divisibility; targets per image: "boxes" (G, 4) xyxy,
    "masks" (G, h, w) {0, 1} and "iscrowd" (G,) at the input resolution; image_sizes: (h, w)
    before padding. Returns per image (G,) float: each instance's mean IoU over its positive
    windows, NaN for a crowd region or an instance without any positive window."""
    was_training = model.training
    model.eval()
    cls, box, masks = model.head_outputs(images, lazy_masks=True)
    grids = model._flatten(cls, box)[2]
    out = []
    for i, t in enumerate(targets):
        boxes, gt_masks = t["boxes"].float(), t["masks"].bool()
        crowd = t["iscrowd"].bool()
        ious = torch.full((len(boxes),), math.nan)
        a = assign_windows(model.groups, grids, boxes, crowd, **model.assign_kwargs)
        flat = (a.labels >= 0).nonzero(as_tuple=True)[0]  # (P,) positive windows
        if flat.numel():
            group, ys, xs, windows = locate_windows(
                model.groups, grids, flat
            )  # windows (P, 4) xyxy
            probs = model.decode_masks(masks, group, ys, xs, i)  # P soft masks (Vo, Uo)
            h, w = image_sizes[i]
            gt_index = a.labels[flat]  # (P,)
            window_iou = torch.empty(flat.numel())
            for s in range(0, flat.numel(), PASTE_CHUNK):
                e = min(s + PASTE_CHUNK, flat.numel())
                pasted = paste_masks(
                    probs[s:e], windows[s:e], h, w, model.mask_threshold
                )  # (C, h, w)
                gt = gt_masks[gt_index[s:e], :h, :w]
                inter = (pasted & gt).flatten(1).sum(1)
                union = (pasted | gt).flatten(1).sum(1)
                window_iou[s:e] = (inter / union.clamp(min=1)).float().cpu()
            sums = torch.zeros(len(boxes)).index_add_(0, gt_index.cpu(), window_iou)
            counts = torch.zeros(len(boxes)).index_add_(
                0, gt_index.cpu(), torch.ones_like(window_iou)
            )
            assigned = counts > 0
            ious[assigned] = sums[assigned] / counts[assigned]
        ious[crowd.cpu()] = math.nan  # a crowd region is not an instance to segment
        out.append(ious)
    model.train(was_training)
    return out


def summarize(ious: np.ndarray, areas: np.ndarray, crowd: np.ndarray) -> dict[str, float]:
    """Per-instance IoUs (NaN: not scored), original-image mask areas and crowd flags -> the
    figures (IoU in %, as COCO AP is reported)."""
    scored = ~np.isnan(ious)
    result: dict[str, float] = {
        "instances": float((~crowd).sum()),
        "unassigned": float((~crowd & ~scored).sum()),
    }

    def mean(sel):
        return float(100 * ious[sel & scored].mean()) if (sel & scored).any() else -1.0

    everything = np.ones_like(scored)
    result["IoU"] = mean(everything)
    result["IoU_S"] = mean(areas < SMALL)
    result["IoU_M"] = mean((areas >= SMALL) & (areas < LARGE))
    result["IoU_L"] = mean(areas >= LARGE)
    for thr in (0.5, 0.75):
        result[f"IoU>={thr:g}"] = (
            float(100 * (ious[scored] >= thr).mean()) if scored.any() else -1.0
        )
    return result


def evaluate_window_masks(
    model, shards_dir: str | Path, cfg: Config, max_images: int = 0
) -> dict[str, float]:
    """The figures above for `model` on a folder of shards, images at the test resolution."""
    from ..config import apply_overrides
    from ..data.transforms import collate_train, train_sample

    # The test-time resize, through the training transform (it carries the masks along), no flip.
    test_cfg = apply_overrides(
        cfg,
        {
            "input.min_size_train": [cfg.input.min_size_test, cfg.input.min_size_test],
            "input.max_size_train": cfg.input.max_size_test,
            "input.flip_prob": 0.0,
        },
    )
    device = next(model.parameters()).device
    manifest = read_manifest(shards_dir)
    categories = CategoryMap.from_manifest(manifest)
    all_ious, all_areas, all_crowd = [], [], []
    seen = 0
    for path in shard_paths(shards_dir, manifest):
        for row in pq.read_table(path).to_pylist():
            if max_images and seen >= max_images:
                break
            seen += 1
            sample = train_sample(row, categories, test_cfg.input, seed=0, epoch=0)
            batch = collate_train([sample], cfg.input.size_divisibility)
            targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
            (ious,) = window_mask_ious(
                model, batch["images"].to(device), targets, batch["image_sizes"]
            )
            (h, w), (oh, ow) = batch["image_sizes"][0], batch["orig_sizes"][0]
            areas = (
                batch["targets"][0]["masks"].flatten(1).sum(1).float() * (oh * ow) / (h * w)
            )  # original pixels
            all_ious.append(ious.numpy())
            all_areas.append(areas.numpy())
            all_crowd.append(batch["targets"][0]["iscrowd"].numpy())
    if not all_ious:
        return summarize(np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool))
    return summarize(np.concatenate(all_ious), np.concatenate(all_areas), np.concatenate(all_crowd))


def format_window_mask_table(result: dict[str, float]) -> str:
    keys = ["IoU", "IoU>=0.5", "IoU>=0.75", "IoU_S", "IoU_M", "IoU_L"]
    head = "  ".join(f"{k:>9}" for k in keys)
    row = "  ".join(f"{result[k]:9.1f}" if result[k] >= 0 else f"{'-':>9}" for k in keys)
    n, u = int(result["instances"]), int(result["unassigned"])
    return f"{head}\n{row}\n({n} instances, {u} without a positive window)"

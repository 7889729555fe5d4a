"""The model each inference worker loads (`ModelSpec`) and the per-image work (`Predictor`): read,
decode, `predict_image` (shorter side to `input.min_size_test`, the image alone in its batch,
predictions at the image's own size), `predictions_to_coco`.

The same `Predictor.predict_one` runs in Ray Data actors and in-process (`num_actors=0`), and it
is `evaluator.predict_image` underneath, so batch, single-process and single-image inference give
the same detections. Batching only groups images per actor call; every image is still run alone
(its own padding), since padding a batch to its largest image would change the features near the
borders and hence the detections.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.transforms import decode_image
from .coco import predictions_to_coco
from .evaluator import predict_image


@dataclass(frozen=True)
class ModelSpec:
    """What each actor loads: a checkpoint (folder or state.pt), dotted config overrides (the
    test-time options), the device, and the COCO category id of each class index."""

    checkpoint: str
    category_ids: tuple[int, ...]
    overrides: tuple[tuple[str, Any], ...] = ()
    device: str = "cpu"

    def load(self):
        """(model in eval mode, Config, categories); UserError naming mismatched weight keys."""
        from ..train.checkpoint import load_model_for_inference

        return load_model_for_inference(self.checkpoint, dict(self.overrides), self.device)


class Predictor:
    """The Ray Data callable class: loads the model once, then maps batches of rows
    {"image_id", "file_name", "image_bytes" | "path"} to one record per image (see `predict_one`).

    num_threads > 0 sets torch's intra-op threads (an actor uses as many as it has CPUs: more
    threads than cores slows a shared CPU down many times over). `loaded`: a (model, cfg) pair
    already loaded from `spec`, for the in-process path."""

    def __init__(self, spec: ModelSpec, num_threads: int = 0, loaded: tuple | None = None):
        import torch

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.model, self.cfg = loaded if loaded is not None else spec.load()[:2]
        self.category_ids = list(spec.category_ids)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        data = batch.get("image_bytes")
        paths = batch.get("path")
        records = [
            self.predict_one(
                int(batch["image_id"][i]),
                str(batch["file_name"][i]),
                data=None if data is None else data[i],
                path=None if paths is None else str(paths[i]),
            )
            for i in range(n)
        ]
        return {
            "image_id": np.array([r["image_id"] for r in records], dtype=np.int64),
            "file_name": np.array([r["file_name"] for r in records], dtype=object),
            "height": np.array([r["height"] for r in records], dtype=np.int64),
            "width": np.array([r["width"] for r in records], dtype=np.int64),
            "error": np.array([r["error"] for r in records], dtype=object),
            "seconds": np.array([r["seconds"] for r in records], dtype=np.float64),
            "results": np.array([r["results"] for r in records], dtype=object),
        }

    def predict_one(
        self, image_id: int, file_name: str, data: bytes | None = None, path: str | None = None
    ) -> dict[str, Any]:
        """One image -> {"image_id", "file_name", "height", "width", "error" ("" when fine),
        "seconds", "results" (the COCO result dicts as a JSON string)}. An image that cannot be
        read or decoded gives a record with the reason in "error", never an exception."""
        t0 = time.perf_counter()
        try:
            if data is None:
                data = Path(path).read_bytes()
            image = decode_image(bytes(data))  # (H, W, 3) uint8
        except Exception as e:  # noqa: BLE001 - whatever fails here is the file's fault
            error = f"cannot read or decode the image ({_reason(e)})"
            return _record(image_id, file_name, 0, 0, error, t0, "[]")
        prediction = predict_image(self.model, image, self.cfg)
        results = predictions_to_coco(prediction, image_id, self.category_ids)
        h, w = image.shape[:2]
        return _record(
            image_id, file_name, h, w, "", t0, json.dumps(results, separators=(",", ":"))
        )


def _reason(e: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image format Pillow can read, or a damaged header"
    if isinstance(e, FileNotFoundError):
        return "no such file"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _record(image_id, file_name, h, w, error, t0, results_json) -> dict[str, Any]:
    return {
        "image_id": int(image_id),
        "file_name": file_name,
        "height": int(h),
        "width": int(w),
        "error": error,
        "seconds": time.perf_counter() - t0,
        "results": results_json,
    }


__all__ = ["ModelSpec", "Predictor"]

"""The MLflow model of a tensormask-ray checkpoint: what `mlflow.pyfunc.load_model` returns.

This module is the logged model's pyfunc `loader_module` (MLflow calls `_load_pyfunc` with the
checkpoint folder the model holds). Whoever logs a model hands `LOADER_MODULE` to
`tracking.RunLogger.log_model` (through `train.trainer`), so tracking and train, the layers below,
need not import the inference they would run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOADER_MODULE = __name__


def _load_pyfunc(data_path: str) -> TensorMaskPredictor:
    """MLflow's pyfunc loader for our logged models (`loader_module` = this module)."""
    return TensorMaskPredictor(data_path)


class TensorMaskPredictor:
    """What `mlflow.pyfunc.load_model` returns for a tensormask-ray model. `predict(images)`:
    an image file path, an (H, W, 3) uint8 RGB array, or a list of them (a pandas DataFrame: its
    first column) -> one list of detections per image, COCO style (category_id, bbox xywh, score,
    segmentation as compressed RLE)."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu"):
        from ..data.manifest import CategoryMap
        from ..train.checkpoint import load_model_for_inference

        self.model, self.cfg, categories = load_model_for_inference(checkpoint, device=device)
        self.device = device
        self.category_ids = list(
            CategoryMap.of_model(
                categories, self.cfg.model.num_classes, f"checkpoint {checkpoint}"
            ).ids
        )

    def predict(self, model_input: Any, params: dict | None = None) -> list[list[dict]]:
        import numpy as np

        from ..data.transforms import decode_image
        from .coco import predictions_to_coco
        from .evaluator import predict_image

        if hasattr(model_input, "iloc"):  # a DataFrame: the first column
            model_input = list(model_input.iloc[:, 0])
        single = isinstance(model_input, (str, Path)) or (
            isinstance(model_input, np.ndarray) and model_input.ndim == 3
        )
        out = []
        for item in [model_input] if single else model_input:
            image = (
                decode_image(Path(item).read_bytes())
                if isinstance(item, (str, Path))
                else np.asarray(item, dtype=np.uint8)
            )
            prediction = predict_image(self.model, image, self.cfg)  # on the model's device
            out.append(predictions_to_coco(prediction, 0, self.category_ids))
        return out


__all__ = ["LOADER_MODULE", "TensorMaskPredictor"]

"""A Detectron2-format TensorMask checkpoint with random weights, made in the test (no download).

The weights are random but shaped so that inference has something to decide: every frozen batch
norm gets the statistics of its input on a calibration image (the features stay O(1) through the
50 layers instead of exploding or vanishing), and the predictors are scaled so that class logits
are spread around -4.5 (a few percent of the ~10^5-10^6 window-class pairs pass the 0.05 score
threshold, more than the 6000 top-k keep), box deltas move and resize windows noticeably, and mask
logits are spread around 0 (masks with shape, few pixels near the 0.5 threshold).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.detectron2_reference import FrozenBatchNorm2d, TensorMask


def _scale_output(conv: nn.Conv2d, features: list[torch.Tensor], std: float, mean: float) -> None:
    """Rescales conv's weight so its outputs on `features` have std `std`, and sets its bias to `mean`."""
    nn.init.normal_(conv.weight)
    nn.init.zeros_(conv.bias)
    with torch.no_grad():
        out = torch.cat([conv(f).flatten() for f in features])
        conv.weight.mul_(std / out.std().clamp(min=1e-12))
        conv.bias.fill_(mean)


@torch.no_grad()
def random_detectron2_tensormask(calibration: torch.Tensor, seed: int = 0) -> TensorMask:
    """The reference model (Detectron2's module names) with random, calibrated weights.
    calibration: a normalised, padded (1, 3, H, W) image (BGR, Detectron2's pixel mean)."""
    g = torch.Generator().manual_seed(seed)
    model = TensorMask().eval()
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            gain = (
                1.0 if name.startswith("backbone.fpn") or ".top_block" in name else math.sqrt(2.0)
            )
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * gain / math.sqrt(fan_in))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        elif isinstance(m, FrozenBatchNorm2d):
            last = name.endswith(
                "conv3.norm"
            )  # the residual branch's last norm: small, keeps the sum O(1)
            m.weight.copy_(
                torch.rand(m.num_features, generator=g) * (0.3 if last else 1.0)
                + (0.1 if last else 0.5)
            )
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)

    def set_statistics(bn, inputs):  # each norm normalises what actually reaches it
        x = inputs[0]
        bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)

    hooks = [
        m.register_forward_pre_hook(set_statistics)
        for m in model.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
    features = model.features(calibration)
    for h in hooks:
        h.remove()
    head = model.head
    torch.manual_seed(seed)
    _scale_output(head.cls_score, [head.cls_subnet(f) for f in features], std=1.0, mean=-4.5)
    _scale_output(head.bbox_pred, [head.bbox_subnet(f) for f in features], std=0.5, mean=0.0)
    fused = head.mask_features(features)
    for size in head.mask_sizes:
        _scale_output(getattr(head, f"mask_pred_{size:02d}"), fused, std=2.5, mean=0.0)
    return model


def to_detectron2_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """state_dict() as the model zoo stores it: {name: float32 numpy array}."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def write_pkl(arrays: dict[str, np.ndarray], path: Path, protocol: int = 2) -> Path:
    """A model-zoo style .pkl: {"model": arrays, "__author__": ...} (protocol 2, as old files)."""
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, f, protocol=protocol)
    return path

"""ResNet bottom-up pathway (torchvision ResNet-18/34/50/101).

Normalisation (`norm`): "FrozenBN" (default; the paper's, for a pretrained backbone: batch norm
with the checkpoint's statistics, frozen) or "GN" (group norm, 32 groups, trained: for training
from random init, where frozen batch norm is the identity and the backbone trains unnormalised;
Wu & He 2018, He et al. 2019 "Rethinking ImageNet pre-training"). Both load a torchvision
checkpoint: GN takes its affine weights and drops its running statistics.

Random init by default. `weights` may name a local torchvision ResNet checkpoint (a state_dict
saved with torch.save, e.g. resnet50-0676ba61.pth copied from a machine that has it); nothing is
ever downloaded.

`stride_in_1x1` gives the MSRA ResNet that Detectron2's models use (RESNETS.STRIDE_IN_1X1): the
first block of res3-res5 strides in its first 1x1 conv instead of its 3x3 conv. The shapes are the
same as torchvision's, so weights of one load silently into the other and compute garbage; the
converter (convert/detectron2.py) builds this variant. Its frozen batch norm computes as
Detectron2's FrozenBatchNorm2d does (`DetectronFrozenBatchNorm2d`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from ..config import BackboneConfig
from ..errors import UserError

_RESNETS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
}


NORMS = ("FrozenBN", "GN")
GN_GROUPS = 32


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GN_GROUPS, channels)


class DetectronFrozenBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers, same state_dict) with Detectron2's arithmetic:
    one fused `F.batch_norm` when no gradient flows to the input (inference, frozen stages), the
    affine form `x * scale + bias` otherwise. The two differ in the last bit of ~1/3 of the values,
    which decides near-ties among 100k candidate scores; this is what Detectron2's checkpoints were
    evaluated with, and it is the faster of the two at inference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            return super().forward(x)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def _stride_in_1x1(net: torchvision.models.ResNet) -> None:
    """Moves the stride of each strided bottleneck from its 3x3 conv (conv2) to its first 1x1 (conv1)."""
    for stage in (net.layer2, net.layer3, net.layer4):
        block = stage[0]
        stride = block.conv2.stride
        block.conv1.stride, block.conv2.stride = stride, (1, 1)


class ResNetBackbone(nn.Module):
    """Returns the C2..C5 feature maps (strides 4, 8, 16, 32) that the FPN needs."""

    def __init__(
        self,
        depth: int,
        weights: str | None,
        freeze_at: int,
        norm: str,
        stride_in_1x1: bool,
    ):
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"ResNet depth must be one of {sorted(_RESNETS)}, got {depth}")
        if norm not in NORMS:
            raise ValueError(f"ResNet norm must be one of {NORMS}, got {norm!r}")
        if stride_in_1x1 and depth < 50:
            raise ValueError(
                f"stride_in_1x1 needs bottleneck blocks (ResNet-50/101), not ResNet-{depth}"
            )
        frozen = DetectronFrozenBatchNorm2d if stride_in_1x1 else FrozenBatchNorm2d
        net = _RESNETS[depth](
            weights=None, norm_layer=frozen if norm == "FrozenBN" else _group_norm
        )
        if stride_in_1x1:
            _stride_in_1x1(net)
        if weights:
            load_torchvision_weights(net, weights)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.res2, self.res3, self.res4, self.res5 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if depth >= 50 else 1
        self.out_channels = {f"C{i + 2}": 64 * 2**i * expansion for i in range(4)}  # C2..C5
        self._freeze(freeze_at)

    def _freeze(self, freeze_at: int) -> None:
        stages = [self.stem, self.res2, self.res3, self.res4, self.res5]
        for stage in stages[:freeze_at]:
            for p in stage.parameters():
                p.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (N, 3, H, W) -> {"C2": (N, c2, H/4, W/4), ..., "C5": (N, c5, H/32, W/32)}."""
        c2 = self.res2(self.stem(images))
        c3 = self.res3(c2)
        c4 = self.res4(c3)
        c5 = self.res5(c4)
        return {"C2": c2, "C3": c3, "C4": c4, "C5": c5}


def load_torchvision_weights(net: nn.Module, path: str) -> None:
    """Loads a local torchvision ResNet state_dict (the classifier `fc.*` is ignored)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"backbone weights not found: {p} (model.backbone.weights must be a local file)"
        )
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/format failure is the user's file
        raise UserError(f"backbone weights {p} could not be read as a torch state_dict: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    # Batch-norm statistics have no place in a group-normalised net; the step counter in none.
    stats = ("num_batches_tracked",) if any(isinstance(m, FrozenBatchNorm2d) for m in net.modules()) else (
        "running_mean", "running_var", "num_batches_tracked")  # fmt: skip
    state = {k: v for k, v in state.items() if not k.endswith(stats)}
    expected = {k for k in net.state_dict() if not k.startswith("fc.")}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(
            f"backbone weights {p} do not match this ResNet: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    net.load_state_dict(state, strict=False)


def build_backbone(b: BackboneConfig) -> ResNetBackbone:
    """The backbone `model.backbone` describes (config.py holds every default)."""
    return ResNetBackbone(b.depth, b.weights, b.freeze_at, b.norm, b.stride_in_1x1)

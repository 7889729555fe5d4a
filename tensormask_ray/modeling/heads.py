"""Class, box and mask heads (paper §4.1, Fig. 6), weights shared across levels, not tasks.

- class tower: depth x (3x3 conv, cls_channels, ReLU), then a 3x3 conv to A*K logits;
- box tower:   depth x (3x3 conv, box_channels, ReLU), then a 3x3 conv to A*4 deltas;
- mask tower:  depth x (3x3 conv, mask_channels, ReLU), then per window size a 1x1 "conv+reshape"
  to a (V', U') grid at every position: V*U channels for the simple heads, V*U/lam^2 for the
  upscale heads. The bipyramid variant of the mask branch lives in bipyramid.py.

A is the number of window sizes, K the number of classes. The mask branch returns the head tensor
BEFORE its window op (align2nat, up_align2nat, ...), dense, or lazy (lazy.py): computed by the model
only on crops around the windows it decodes (the positives in training, the survivors of NMS in
inference).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .bipyramid import BipyramidFusion, LazyBipyramidMasks
from .lazy import LazyMasks, LazyPyramidMasks


def conv_tower(in_channels: int, channels: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [
            nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class TensorMaskHead(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        window_sizes: list[int],
        coarse_sizes: list[int],
        bipyramid: bool,
        cls_channels: int,
        box_channels: int,
        mask_channels: int,
        tower_depth: int,
        prior_prob: float,
    ):
        super().__init__()
        A = len(window_sizes)
        self.num_classes, self.coarse_sizes = num_classes, list(coarse_sizes)
        tail = lambda ch: ch if tower_depth > 0 else in_channels  # noqa: E731
        self.cls_tower = conv_tower(in_channels, cls_channels, tower_depth)
        self.box_tower = conv_tower(in_channels, box_channels, tower_depth)
        self.mask_tower = conv_tower(in_channels, mask_channels, tower_depth)
        self.cls_pred = nn.Conv2d(tail(cls_channels), A * num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(tail(box_channels), A * 4, 3, padding=1)
        self.bipyramid = BipyramidFusion(tail(mask_channels)) if bipyramid else None
        self.mask_preds = nn.ModuleList(
            nn.Conv2d(tail(mask_channels), c * c, 1) for c in coarse_sizes
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_pred.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(
        self, features: list[torch.Tensor], lazy_masks: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]] | LazyMasks]:
        """features: per level (N, C, H_l, W_l). Returns, per level:
        cls (N, A*K, H_l, W_l), box (N, A*4, H_l, W_l), and per window size the mask head tensor
        (N, V', U', H_m, W_m): (H_m, W_m) = (H_l, W_l), or the finest level's size for the bipyramid.
        lazy_masks: the mask output is returned as LazyMasks (LazyBipyramidMasks for the bipyramid,
        else LazyPyramidMasks), to be computed only around the windows that get decoded.
        """
        cls = [self.cls_pred(self.cls_tower(f)) for f in features]
        box = [self.box_pred(self.box_tower(f)) for f in features]
        mask_feats = [self.mask_tower(f) for f in features]
        if self.bipyramid is not None and lazy_masks:
            return (
                cls,
                box,
                LazyBipyramidMasks(self.bipyramid, self.mask_preds, self.coarse_sizes, mask_feats),
            )
        if lazy_masks:
            return cls, box, LazyPyramidMasks(self.mask_preds, self.coarse_sizes, mask_feats)
        if self.bipyramid is not None:
            mask_feats = self.bipyramid(mask_feats)  # every level at the finest resolution
        masks = []
        for f in mask_feats:
            N, _, H, W = f.shape
            masks.append(
                [pred(f).view(N, c, c, H, W) for pred, c in zip(self.mask_preds, self.coarse_sizes)]
            )
        return cls, box, masks

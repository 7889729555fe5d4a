"""TensorMask: ResNet-FPN, class/box/mask heads over dense sliding windows, trained with the
mask-driven assignment and FL*/l1/weighted-BCE losses, decoded sparsely at inference.

    forward_training : images -> features -> head tensors -> targets -> losses
    forward_inference: images -> features -> head tensors -> top-k + NMS -> masks of the survivors

`geometry` "detectron2" makes the same model compute what Detectron2's TensorMask computes
(windows.py, assignment.py, postprocess.py say where and how; docs/detectron2.md lists it all).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..ops.sparse import decode_windows
from .backbone import ResNetBackbone, build_backbone
from .bipyramid import LazyBipyramidMasks
from .fpn import FPN
from .heads import TensorMaskHead
from .losses import box_l1_loss, focal_loss_star, mask_bce_loss
from .postprocess import (
    Detections,
    clip_and_drop_empty,
    paste_masks,
    select_detections,
    select_detections_detectron2,
)
from .targets import build_targets
from .windows import WindowGroup, build_window_groups, coarse_size


class TensorMask(nn.Module):
    def __init__(
        self,
        backbone: ResNetBackbone,
        fpn: FPN,
        head: TensorMaskHead,
        groups: list[WindowGroup],
        num_classes: int,
        window_sizes: list[int],
        pad_value: float,
        *,
        loss_weights: tuple[float, float, float],  # cls, box, mask
        focal_gamma: float,
        focal_alpha: float,
        mask_fg_weight: float,
        assign_kwargs: dict,
        score_thresh: float,
        topk_candidates: int,
        nms_thresh: float,
        detections_per_image: int,
        mask_threshold: float,
        geometry: str,
        box_weights: tuple[float, float, float, float],
    ):
        """Built by `build_model(cfg)`: every argument comes from the config, the one home of
        their defaults."""
        super().__init__()
        self.geometry, self.box_weights = geometry, tuple(box_weights)
        self.backbone, self.fpn, self.head = backbone, fpn, head
        self.groups = groups
        self.num_classes, self.window_sizes, self.pad_value = num_classes, list(window_sizes), pad_value
        self.loss_weights = loss_weights
        self.focal_gamma, self.focal_alpha, self.mask_fg_weight = focal_gamma, focal_alpha, mask_fg_weight
        self.assign_kwargs = dict(assign_kwargs or {})
        self.score_thresh, self.topk_candidates, self.nms_thresh = score_thresh, topk_candidates, nms_thresh
        self.detections_per_image, self.mask_threshold = detections_per_image, mask_threshold

    # ------------------------------------------------------------------ shared stages
    def head_outputs(self, images: torch.Tensor, lazy_masks: bool = False):
        """images (N, 3, H, W), H and W multiples of 32 -> per level cls (N, A*K, H_l, W_l),
        box (N, A*4, H_l, W_l) and per level and window size the mask head tensor (N, V', U', H_m, W_m)
        (lazy_masks: for the bipyramid, a LazyBipyramidMasks that decode_masks computes on demand)."""
        feats = self.fpn(self.backbone(images))
        return self.head(feats, lazy_masks=lazy_masks)

    def _flatten(self, cls: list[torch.Tensor], box: list[torch.Tensor]):
        """-> cls (N, M, K), box (N, M, 4), grids [(Hg, Wg)] in group order."""
        A, K = len(self.window_sizes), self.num_classes
        cls_flat, box_flat, grids = [], [], []
        for g in self.groups:
            c = cls[g.k][:, g.size_index * K : (g.size_index + 1) * K]  # (N, K, H, W)
            b = box[g.k][:, g.size_index * 4 : (g.size_index + 1) * 4]  # (N, 4, H, W)
            N, _, H, W = c.shape
            grids.append((H, W))
            cls_flat.append(c.permute(0, 2, 3, 1).reshape(N, H * W, K))
            box_flat.append(b.permute(0, 2, 3, 1).reshape(N, H * W, 4))
        assert len(cls) * A == len(self.groups)
        return torch.cat(cls_flat, 1), torch.cat(box_flat, 1), grids

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None, image_sizes=None, output_sizes=None):
        if self.training:
            if targets is None:
                raise ValueError("TensorMask in training mode needs targets")
            return self.forward_training(images, targets)
        return self.forward_inference(images, image_sizes, output_sizes)

    # ------------------------------------------------------------------ training
    def forward_training(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        """images (N, 3, H, W); targets per image: boxes (G, 4), labels (G,), masks (G, h, w),
        iscrowd (G,). Returns the weighted losses {"loss_cls", "loss_box", "loss_mask"}."""
        cls, box, masks = self.head_outputs(images)
        cls_flat, box_flat, grids = self._flatten(cls, box)
        t = build_targets(self.groups, grids, targets, self.num_classes, **self.assign_kwargs, box_weights=self.box_weights)
        normalizer = max(1.0, float(t.num_fg))

        valid = t.cls >= 0  # (N, M)
        onehot = torch.zeros_like(cls_flat[valid])
        fg_valid = t.cls[valid] < self.num_classes
        onehot[fg_valid.nonzero(as_tuple=True)[0], t.cls[valid][fg_valid]] = 1
        loss_cls = focal_loss_star(cls_flat[valid], onehot, self.focal_gamma, self.focal_alpha) / normalizer
        loss_box = box_l1_loss(box_flat[t.fg], t.box_deltas.to(box_flat.dtype)) / normalizer

        loss_mask = sum(m.sum() for level in masks for m in level) * 0.0  # keeps every mask param in the graph
        for g, pos in zip(self.groups, t.positives):
            if pos.image.numel() == 0:
                continue
            natural = g.op.dense(masks[g.k][g.size_index], self.pad_value)  # (N, Vo, Uo, Hg, Wg)
            pred = natural[pos.image, :, :, pos.ys, pos.xs]  # (P, Vo, Uo)
            loss_mask = loss_mask + mask_bce_loss(pred, pos.masks, self.mask_fg_weight)
        loss_mask = loss_mask / normalizer
        w_cls, w_box, w_mask = self.loss_weights
        return {"loss_cls": w_cls * loss_cls, "loss_box": w_box * loss_box, "loss_mask": w_mask * loss_mask}

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def forward_inference(
        self,
        images: torch.Tensor,
        image_sizes: list[tuple[int, int]] | None = None,
        output_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """images (N, 3, H, W); image_sizes: the (h, w) of each image before padding; output_sizes:
        the resolution to report in (the original image size). Returns per image {"boxes" (D, 4),
        "scores" (D,), "labels" (D,), "masks" (D, H_out, W_out) bool} in output coordinates."""
        N = images.shape[0]
        image_sizes = image_sizes or [tuple(images.shape[-2:])] * N
        output_sizes = output_sizes or image_sizes
        cls, box, masks = self.head_outputs(images, lazy_masks=True)
        cls_flat, box_flat, grids = self._flatten(cls, box)
        results = []
        for i in range(N):
            (h, w), (oh, ow) = image_sizes[i], output_sizes[i]
            det = self.select_detections(cls, box, cls_flat, box_flat, grids, i, (h, w))
            scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], device=det.boxes.device)
            boxes, nonempty = clip_and_drop_empty(det.boxes * scale, oh, ow)
            if self.geometry == "detectron2":  # its _postprocess: empty boxes go after NMS
                det = Detections(*(getattr(det, f)[nonempty] for f in Detections.__dataclass_fields__))
                boxes = boxes[nonempty]
            probs = self.decode_masks(masks, det.group, det.ys, det.xs, i)
            pasted = paste_masks(probs, det.windows * scale, oh, ow, self.mask_threshold)
            results.append({"boxes": boxes, "scores": det.scores, "labels": det.labels, "masks": pasted})
        return results

    def select_detections(self, cls, box, cls_flat, box_flat, grids, image: int, image_size: tuple[int, int]) -> Detections:
        """Top-k + NMS for one image, as the geometry does it (postprocess.py). cls/box: the head's
        per-level outputs; cls_flat/box_flat/grids: the same flattened in window-group order."""
        if self.geometry == "detectron2":
            return select_detections_detectron2(
                self.groups, cls, box, image, self.score_thresh, self.topk_candidates, self.nms_thresh,
                self.detections_per_image, self.box_weights,
            )  # fmt: skip
        return select_detections(
            self.groups, grids, cls_flat[image], box_flat[image], image_size, self.score_thresh,
            self.topk_candidates, self.nms_thresh, self.detections_per_image, self.box_weights,
        )  # fmt: skip

    def decode_masks(
        self, masks, group: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, image: int, dense: bool = False
    ) -> list[torch.Tensor]:
        """Soft natural masks (Vo, Uo) of the given windows of one image, computed sparsely from the
        head tensors: never the dense >100k-window output. dense=True decodes every window with the
        dense op and then picks the same ones (for validation only)."""
        if isinstance(masks, LazyBipyramidMasks):
            if not dense:
                return self._decode_lazy(masks, group, ys, xs, image)
            masks = [[masks.dense(k, a) for a in range(len(self.window_sizes))] for k in range(len(masks.mask_feats))]
        out: list[torch.Tensor | None] = [None] * group.numel()
        for gi in group.unique().tolist():
            g = self.groups[gi]
            sel = (group == gi).nonzero(as_tuple=True)[0]
            x = masks[g.k][g.size_index][image : image + 1]  # (1, V', U', H_m, W_m)
            if dense:
                logits = g.op.dense(x, self.pad_value)[torch.zeros_like(sel), :, :, ys[sel], xs[sel]]  # (K, Vo, Uo)
            else:
                logits = decode_windows(x, g.op, torch.zeros_like(sel), ys[sel], xs[sel], self.pad_value)
            for j, m in zip(sel.tolist(), logits.sigmoid()):
                out[j] = m
        return out  # type: ignore[return-value]

    def _decode_lazy(
        self, masks: LazyBipyramidMasks, group: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, image: int
    ) -> list[torch.Tensor]:
        """decode_masks for the bipyramid's lazy output: per level with detections, the fused
        features on one crop (the union of the windows' footprints) or on one crop per window,
        whichever covers fewer positions; then each window size's conv+reshape and swap_align2nat
        at those windows (decode_windows on the crop)."""
        out: list[torch.Tensor | None] = [None] * group.numel()
        H, W = masks.size
        zero = torch.zeros((), dtype=torch.long, device=ys.device)
        level_of = torch.tensor([g.k for g in self.groups], device=group.device)[group]  # (D,)
        for k in level_of.unique().tolist():
            at_level = (level_of == k).nonzero(as_tuple=True)[0]
            foot = torch.empty((at_level.numel(), 4), dtype=torch.long, device=ys.device)  # (D_k, 4) [r0, r1, c0, c1)
            for gi in group[at_level].unique().tolist():
                mine = group[at_level] == gi
                foot[mine] = self.groups[gi].op.footprints(ys[at_level][mine], xs[at_level][mine], (H, W)).long()
            halo = lambda r0, r1, c0, c1: (min(r1 + 1, H) - max(r0 - 1, 0)) * (min(c1 + 1, W) - max(c0 - 1, 0))  # noqa: E731
            union = (int(foot[:, 0].min()), int(foot[:, 1].max()), int(foot[:, 2].min()), int(foot[:, 3].max()))
            separate = sum(halo(*f) for f in foot.tolist())
            crops = [(at_level, union)] if halo(*union) <= separate else [
                (at_level[j : j + 1], tuple(f)) for j, f in enumerate(foot.tolist())
            ]  # fmt: skip
            for members, (r0, r1, c0, c1) in crops:
                fused = masks.fused_crop(k, image, (r0, r1), (c0, c1))  # (1, C, r1 - r0, c1 - c0)
                for gi in group[members].unique().tolist():
                    g = self.groups[gi]
                    sel = members[group[members] == gi]
                    x = masks.head_crop(fused, g.size_index)  # (1, V, U, r1 - r0, c1 - c0)
                    logits = decode_windows(
                        x, g.op, zero.expand(sel.numel()), ys[sel], xs[sel], self.pad_value, origin=(r0, c0), bounds=(H, W)
                    )  # (K, Vo, Uo)
                    for j, m in zip(sel.tolist(), logits.sigmoid()):
                        out[j] = m
        return out  # type: ignore[return-value]


def build_model(cfg: Config) -> TensorMask:
    m = cfg.model
    backbone = build_backbone(m.backbone)
    fpn = FPN(backbone.out_channels, m.fpn_channels, m.min_level, m.max_level, m.fpn_fuse)
    coarse = [coarse_size(m.mask_head, v, m.upscale_factor) for v in m.window_sizes]
    head = TensorMaskHead(
        m.fpn_channels, m.num_classes, m.window_sizes, coarse, m.mask_head == "bipyramid",
        m.cls_channels, m.box_channels, m.mask_channels, m.tower_depth, m.prior_prob,
    )  # fmt: skip
    groups = build_window_groups(
        m.mask_head, m.window_sizes, m.min_level, m.max_level, m.upscale_factor, m.upscale_mode, m.geometry
    )
    a, lo, inf = cfg.assign, cfg.loss, cfg.inference
    model = TensorMask(
        backbone, fpn, head, groups, m.num_classes, m.window_sizes, m.pad_value,
        loss_weights=(lo.cls_weight, lo.box_weight, lo.mask_weight),
        focal_gamma=lo.focal_gamma, focal_alpha=lo.focal_alpha, mask_fg_weight=lo.mask_fg_weight,
        assign_kwargs=dict(scale_ratio=a.scale_ratio, center_radius=a.center_radius, uniqueness=a.uniqueness,
                           small_object_fallback=a.small_object_fallback, geometry=m.geometry),
        score_thresh=inf.score_thresh, topk_candidates=inf.topk_candidates, nms_thresh=inf.nms_thresh,
        detections_per_image=inf.detections_per_image, mask_threshold=inf.mask_threshold,
        geometry=m.geometry, box_weights=tuple(m.box_weights),
    )  # fmt: skip
    if m.weights:  # fine-tuning: every weight from a checkpoint of ours (e.g. a converted one)
        from ..train.checkpoint import load_weights, read_state

        load_weights(model, read_state(m.weights)["model"], m.weights)
    return model

"""TensorMask: ResNet-FPN, class/box/mask heads over dense sliding windows, trained with the
mask-driven assignment and FL*/l1/weighted-BCE losses, decoded sparsely at inference.

    forward_training : images -> features -> head tensors -> targets -> losses (the mask branch
                       only on crops the positive windows read, or densely: `mask_training`)
    forward_inference: images -> features -> head tensors -> top-k + NMS -> masks of the survivors

`geometry` "detectron2" makes the same model compute what Detectron2's TensorMask computes
(windows.py, assignment.py, postprocess.py say where and how; docs/detectron2.md lists it all).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from .assignment import IGNORE
from .backbone import ResNetBackbone, build_backbone
from .fpn import FPN
from .heads import TensorMaskHead
from .lazy import LazyMasks, decode_lazy
from .losses import box_l1_loss, focal_loss_star, mask_bce_loss
from .mask_heads import build_mask_head
from .postprocess import (
    Detections,
    clip_and_drop_empty,
    paste_masks,
    select_detections,
    select_detections_detectron2,
)
from .targets import GroupPositives, build_targets
from .window_op import decode_windows
from .windows import WindowGroup, build_window_groups

MASK_TRAINING = ("sparse", "dense")


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
        mask_training: str,
    ):
        """Built by `build_model(cfg)`: every argument comes from the config, the one home of
        their defaults."""
        super().__init__()
        if mask_training not in MASK_TRAINING:
            raise ValueError(f"mask_training must be one of {MASK_TRAINING}, got {mask_training!r}")
        self.mask_training = mask_training
        self.geometry, self.box_weights = geometry, tuple(box_weights)
        self.backbone, self.fpn, self.head = backbone, fpn, head
        self.groups = groups
        self.num_classes, self.window_sizes, self.pad_value = (
            num_classes,
            list(window_sizes),
            pad_value,
        )
        self.loss_weights = loss_weights
        self.focal_gamma, self.focal_alpha, self.mask_fg_weight = (
            focal_gamma,
            focal_alpha,
            mask_fg_weight,
        )
        self.assign_kwargs = dict(assign_kwargs or {})
        self.score_thresh, self.topk_candidates, self.nms_thresh = (
            score_thresh,
            topk_candidates,
            nms_thresh,
        )
        self.detections_per_image, self.mask_threshold = detections_per_image, mask_threshold

    # ------------------------------------------------------------------ shared stages
    def head_outputs(self, images: torch.Tensor, lazy_masks: bool = False):
        """images (N, 3, H, W), H and W multiples of 32 -> per level cls (N, A*K, H_l, W_l),
        box (N, A*4, H_l, W_l) and per level and window size the mask head tensor (N, V', U', H_m, W_m)
        (lazy_masks: a LazyMasks that decode_masks / the mask loss compute on crops on demand)."""
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

    def forward(
        self,
        images: torch.Tensor,
        targets: list[dict] | None = None,
        image_sizes=None,
        output_sizes=None,
    ):
        if self.training:
            if targets is None:
                raise ValueError("TensorMask in training mode needs targets")
            return self.forward_training(images, targets)
        return self.forward_inference(images, image_sizes, output_sizes)

    # ------------------------------------------------------------------ training
    def forward_training(
        self, images: torch.Tensor, targets: list[dict]
    ) -> dict[str, torch.Tensor]:
        """images (N, 3, H, W); targets per image: boxes (G, 4), labels (G,), masks (G, h, w),
        iscrowd (G,). Returns the weighted losses {"loss_cls", "loss_box", "loss_mask"}."""
        sparse = self.mask_training == "sparse"
        cls, box, masks = self.head_outputs(images, lazy_masks=sparse)
        cls_flat, box_flat, grids = self._flatten(cls, box)
        # The losses in float32 under autocast (solver.amp): FL* and the BCE evaluated and summed
        # over every window in bf16 would keep about 3 significant digits; a no-op in fp32/fp64.
        cls_flat, box_flat = _at_least_float32(cls_flat), _at_least_float32(box_flat)
        t = build_targets(
            self.groups,
            grids,
            targets,
            self.num_classes,
            **self.assign_kwargs,
            box_weights=self.box_weights,
        )
        normalizer = max(1.0, float(t.num_fg))

        valid = t.cls != IGNORE  # (N, M)
        onehot = torch.zeros_like(cls_flat[valid])
        fg_valid = t.cls[valid] < self.num_classes
        onehot[fg_valid.nonzero(as_tuple=True)[0], t.cls[valid][fg_valid]] = 1
        loss_cls = (
            focal_loss_star(cls_flat[valid], onehot, self.focal_gamma, self.focal_alpha)
            / normalizer
        )
        loss_box = box_l1_loss(box_flat[t.fg], t.box_deltas.to(box_flat.dtype)) / normalizer

        loss_mask = (
            self.mask_loss_sparse(masks, t.positives)
            if sparse
            else self.mask_loss_dense(masks, t.positives)
        )
        loss_mask = loss_mask / normalizer
        w_cls, w_box, w_mask = self.loss_weights
        return {
            "loss_cls": w_cls * loss_cls,
            "loss_box": w_box * loss_box,
            "loss_mask": w_mask * loss_mask,
        }

    def mask_loss_dense(
        self, masks: list[list[torch.Tensor]], positives: list[GroupPositives]
    ) -> torch.Tensor:
        """The summed mask loss of the positive windows, from every level's dense natural masks."""
        loss = (
            sum(m.sum() for level in masks for m in level) * 0.0
        )  # keeps every mask param in the graph
        for g, pos in zip(self.groups, positives):
            if pos.image.numel() == 0:
                continue
            natural = g.op.dense(masks[g.k][g.size_index], self.pad_value)  # (N, Vo, Uo, Hg, Wg)
            pred = _at_least_float32(natural[pos.image, :, :, pos.ys, pos.xs])  # (P, Vo, Uo)
            loss = loss + mask_bce_loss(pred, pos.masks, self.mask_fg_weight)
        return loss

    def mask_loss_sparse(self, masks: LazyMasks, positives: list[GroupPositives]) -> torch.Tensor:
        """mask_loss_dense's value, with the mask head and window ops run only on crops around the
        positive windows (decode_lazy): the cost follows the number of positives, not the image area."""
        loss = masks.zero_in_graph()  # keeps every mask param in the graph, as the dense path does
        group = torch.cat([torch.full_like(p.image, gi) for gi, p in enumerate(positives)])  # (P,)
        cat = lambda field: torch.cat([getattr(p, field) for p in positives])  # noqa: E731
        starts = torch.tensor([0] + [p.image.numel() for p in positives]).cumsum(0).tolist()
        for gi, sel, pred in decode_lazy(
            masks, self.groups, group, cat("image"), cat("ys"), cat("xs"), self.pad_value
        ):
            target = positives[gi].masks[sel - starts[gi]]  # (P_c, Vo, Uo)
            loss = loss + mask_bce_loss(_at_least_float32(pred), target, self.mask_fg_weight)
        return loss

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
                det = Detections(
                    *(getattr(det, f)[nonempty] for f in Detections.__dataclass_fields__)
                )
                boxes = boxes[nonempty]
            probs = self.decode_masks(masks, det.group, det.ys, det.xs, i)
            pasted = paste_masks(probs, det.windows * scale, oh, ow, self.mask_threshold)
            results.append(
                {"boxes": boxes, "scores": det.scores, "labels": det.labels, "masks": pasted}
            )
        return results

    def select_detections(
        self, cls, box, cls_flat, box_flat, grids, image: int, image_size: tuple[int, int]
    ) -> Detections:
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
        self,
        masks,
        group: torch.Tensor,
        ys: torch.Tensor,
        xs: torch.Tensor,
        image: int,
        dense: bool = False,
    ) -> list[torch.Tensor]:
        """Soft natural masks (Vo, Uo) of the given windows of one image, computed sparsely from the
        head tensors: never the dense >100k-window output. dense=True decodes every window with the
        dense op and then picks the same ones (for validation only)."""
        if isinstance(masks, LazyMasks):
            if not dense:
                out: list[torch.Tensor | None] = [None] * group.numel()
                at = torch.full_like(group, image)
                for _, sel, logits in decode_lazy(
                    masks, self.groups, group, at, ys, xs, self.pad_value
                ):
                    for j, m in zip(sel.tolist(), logits.sigmoid()):
                        out[j] = m
                return out  # type: ignore[return-value]
            masks = [
                [masks.dense(k, a) for a in range(len(self.window_sizes))]
                for k in range(len(masks.mask_feats))
            ]
        out: list[torch.Tensor | None] = [None] * group.numel()
        for gi in group.unique().tolist():
            g = self.groups[gi]
            sel = (group == gi).nonzero(as_tuple=True)[0]
            x = masks[g.k][g.size_index][image : image + 1]  # (1, V', U', H_m, W_m)
            if dense:
                logits = g.op.dense(x, self.pad_value)[
                    torch.zeros_like(sel), :, :, ys[sel], xs[sel]
                ]  # (K, Vo, Uo)
            else:
                logits = decode_windows(
                    x, g.op, torch.zeros_like(sel), ys[sel], xs[sel], self.pad_value
                )
            for j, m in zip(sel.tolist(), logits.sigmoid()):
                out[j] = m
        return out  # type: ignore[return-value]


def build_model(cfg: Config) -> TensorMask:
    m = cfg.model
    backbone = build_backbone(m.backbone)
    fpn = FPN(backbone.out_channels, m.fpn_channels, m.min_level, m.max_level, m.fpn_fuse)
    mask_head = build_mask_head(m.mask_head, m.upscale_factor, m.upscale_mode, m.geometry)
    coarse = [mask_head.coarse_size(v) for v in m.window_sizes]
    head = TensorMaskHead(
        m.fpn_channels, m.num_classes, m.window_sizes, coarse, m.mask_head == "bipyramid",
        m.cls_channels, m.box_channels, m.mask_channels, m.tower_depth, m.prior_prob,
    )  # fmt: skip
    groups = build_window_groups(mask_head, m.window_sizes, m.min_level, m.max_level)
    a, lo, inf = cfg.assign, cfg.loss, cfg.inference
    model = TensorMask(
        backbone, fpn, head, groups, m.num_classes, m.window_sizes, m.pad_value,
        loss_weights=(lo.cls_weight, lo.box_weight, lo.mask_weight),
        focal_gamma=lo.focal_gamma, focal_alpha=lo.focal_alpha, mask_fg_weight=lo.mask_fg_weight,
        assign_kwargs=dict(scale_ratio=a.scale_ratio, center_radius=a.center_radius, uniqueness=a.uniqueness,
                           small_object_fallback=a.small_object_fallback, geometry=m.geometry),
        score_thresh=inf.score_thresh, topk_candidates=inf.topk_candidates, nms_thresh=inf.nms_thresh,
        detections_per_image=inf.detections_per_image, mask_threshold=inf.mask_threshold,
        geometry=m.geometry, box_weights=tuple(m.box_weights), mask_training=m.mask_training,
    )  # fmt: skip
    if m.weights:  # fine-tuning: every weight from a checkpoint of ours (e.g. a converted one)
        from .checkpoint_file import load_weights, read_state

        load_weights(model, read_state(m.weights)["model"], m.weights)
    return model


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 when autocast made it bf16/fp16 (the losses' inputs); float64 stays."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x

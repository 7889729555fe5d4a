"""Detectron2's TensorMask at inference, written in plain PyTorch from reading its code, for tests.

Independent of tensormask_ray.modeling: this is the yardstick the converted model is held to. Each
piece follows the Detectron2 source it names (facebookresearch/detectron2, read at commit 02b5c4e):

    detectron2/modeling/backbone/resnet.py   BasicStem, BottleneckBlock (STRIDE_IN_1X1), ResNet
    detectron2/layers/batch_norm.py          FrozenBatchNorm2d (F.batch_norm without grad)
    detectron2/layers/wrappers.py            Conv2d(norm=...)
    detectron2/modeling/backbone/fpn.py      FPN (FUSE_TYPE avg), LastLevelP6P7 on res5
    projects/TensorMask/tensormask/arch.py   TensorMaskHead, TensorMaskAnchorGenerator,
                                             inference_single_image, _postprocess,
                                             _paste_mask_lists_in_image
    projects/TensorMask/.../SwapAlign2Nat_cuda.cu   SwapAlign2NatForwardFeat (the 16-term sum)
    detectron2/modeling/box_regression.py    Box2BoxTransform.apply_deltas
    detectron2/layers/mask_ops.py            paste_masks_in_image, _do_paste_mask (CPU path)
    detectron2/data/transforms               ResizeShortestEdge.get_output_shape, PIL bilinear
    detectron2/structures/image_list.py      ImageList.from_tensors (pad to 32 with 0)

Module names are Detectron2's, so `state_dict()` of a `TensorMask` here has exactly the keys of a
Detectron2 TensorMask checkpoint (model_final_*.pkl's "model").
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import boxes as box_ops

PIXEL_MEAN = [103.530, 116.280, 123.675]  # MODEL.PIXEL_MEAN, BGR
PIXEL_STD = [1.0, 1.0, 1.0]
ANCHOR_SIZES = [[44, 60], [88, 120], [176, 240], [352, 480], [704, 960], [1408, 1920]]
BBOX_REG_WEIGHTS = (1.5, 1.5, 0.75, 0.75)
SCALE_CLAMP = math.log(1000.0 / 16)


# ----------------------------------------------------------------------------- layers
class FrozenBatchNorm2d(nn.Module):
    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x):
        assert not x.requires_grad  # the reference runs inference only
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=False,
            eps=self.eps,
        )


class Conv2d(nn.Conv2d):
    def __init__(self, *args, norm=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm

    def forward(self, x):
        x = F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        if self.norm is not None:
            x = self.norm(x)
        return x


# ----------------------------------------------------------------------------- backbone
class BasicStem(nn.Module):
    def __init__(self, in_channels=3, out_channels=64):
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3, bias=False,
                            norm=FrozenBatchNorm2d(out_channels))  # fmt: skip

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu_(x)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    def __init__(
        self, in_channels, out_channels, *, bottleneck_channels, stride=1, stride_in_1x1=True
    ):
        super().__init__()
        if in_channels != out_channels:
            self.shortcut = Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False,
                                   norm=FrozenBatchNorm2d(out_channels))  # fmt: skip
        else:
            self.shortcut = None
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(in_channels, bottleneck_channels, kernel_size=1, stride=stride_1x1, bias=False,
                            norm=FrozenBatchNorm2d(bottleneck_channels))  # fmt: skip
        self.conv2 = Conv2d(bottleneck_channels, bottleneck_channels, kernel_size=3, stride=stride_3x3, padding=1,
                            bias=False, norm=FrozenBatchNorm2d(bottleneck_channels))  # fmt: skip
        self.conv3 = Conv2d(bottleneck_channels, out_channels, kernel_size=1, bias=False,
                            norm=FrozenBatchNorm2d(out_channels))  # fmt: skip

    def forward(self, x):
        out = self.conv1(x)
        out = F.relu_(out)
        out = self.conv2(out)
        out = F.relu_(out)
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        out += shortcut
        return F.relu_(out)


class ResNet(nn.Module):
    """build_resnet_backbone with DEPTH 50, OUT_FEATURES res2..res5, STRIDE_IN_1X1 True."""

    def __init__(self, depth=50):
        super().__init__()
        blocks = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
        self.stem = BasicStem()
        in_channels, out_channels, bottleneck = 64, 256, 64
        self.stage_names = []
        for idx, n in enumerate(blocks):
            first_stride = 1 if idx == 0 else 2
            stage = [
                BottleneckBlock(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    bottleneck_channels=bottleneck,
                    stride=first_stride if i == 0 else 1,
                )  # fmt: skip
                for i in range(n)
            ]
            name = f"res{idx + 2}"
            self.add_module(name, nn.Sequential(*stage))
            self.stage_names.append(name)
            in_channels, out_channels, bottleneck = out_channels, out_channels * 2, bottleneck * 2

    def forward(self, x):
        outputs = {}
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outputs[name] = x
        return outputs


class LastLevelP6P7(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)

    def forward(self, c5):
        p6 = self.p6(c5)
        p7 = self.p7(F.relu(p6))
        return [p6, p7]


class FPN(nn.Module):
    """build_retinanet_resnet_fpn_backbone: IN_FEATURES res2..res5, FUSE_TYPE avg, P6/P7 from res5."""

    def __init__(self, bottom_up: ResNet, out_channels=256):
        super().__init__()
        self.bottom_up = bottom_up
        self.in_features = ["res2", "res3", "res4", "res5"]
        in_channels = [256, 512, 1024, 2048]
        lateral, output = [], []
        for stage, c in zip(range(2, 6), in_channels):
            lateral_conv = Conv2d(c, out_channels, kernel_size=1, bias=True)
            output_conv = Conv2d(
                out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=True
            )
            self.add_module(f"fpn_lateral{stage}", lateral_conv)
            self.add_module(f"fpn_output{stage}", output_conv)
            lateral.append(lateral_conv)
            output.append(output_conv)
        self.lateral_convs, self.output_convs = (
            lateral[::-1],
            output[::-1],
        )  # plain lists: not registered
        self.top_block = LastLevelP6P7(in_channels[-1], out_channels)
        self.size_divisibility = 32

    def forward(self, x):
        bottom_up_features = self.bottom_up(x)
        results = []
        prev_features = self.lateral_convs[0](bottom_up_features[self.in_features[-1]])
        results.append(self.output_convs[0](prev_features))
        for idx, (lateral_conv, output_conv) in enumerate(
            zip(self.lateral_convs, self.output_convs)
        ):
            if idx > 0:
                features = bottom_up_features[self.in_features[-idx - 1]]
                top_down_features = F.interpolate(prev_features, scale_factor=2.0, mode="nearest")
                lateral_features = lateral_conv(features)
                prev_features = lateral_features + top_down_features
                prev_features /= 2  # "avg"
                results.insert(0, output_conv(prev_features))
        results.extend(self.top_block(bottom_up_features["res5"]))
        return dict(zip(["p2", "p3", "p4", "p5", "p6", "p7"], results))


# ----------------------------------------------------------------------------- SwapAlign2Nat
def swap_align2nat(
    X: torch.Tensor, lambda_val: int, pad_val: float = -6.0, positions=None
) -> torch.Tensor:
    """SwapAlign2NatForwardFeat on (N, Vin*Uin, Hin, Win) -> (N, Vout*Uout, Hout, Wout), literally:
    per output element the 16 terms in the kernel's order, weights in float32 as it computes them.
    positions = (ys, xs), (K,) each: only the outputs at those (y, x) (every v, u), (N, Vout*Uout, K):
    the same per-element formula, for the windows that inference reads."""
    N, C, Hin, Win = X.shape
    Vin = int(math.sqrt(C))
    Uin = C // Vin
    Vout, Uout = lambda_val * Vin, lambda_val * Uin
    lam = float(lambda_val)
    Hout, Wout = math.ceil(Hin / lam), math.ceil(Win / lam)
    hVout, hUout = Vout / 2.0, Uout / 2.0
    f32 = torch.float32
    if positions is None:
        y = torch.arange(Hout).view(1, 1, Hout, 1).expand(1, 1, Hout, Wout).reshape(1, 1, -1)
        x = torch.arange(Wout).view(1, 1, 1, Wout).expand(1, 1, Hout, Wout).reshape(1, 1, -1)
    else:
        y, x = (torch.as_tensor(t).long().view(1, 1, -1) for t in positions)
    v = torch.arange(Vout).view(Vout, 1, 1)
    u = torch.arange(Uout).view(1, Uout, 1)

    def taps(o):
        f = torch.floor(o)
        c = torch.ceil(o)
        wc = o - f
        return f.long(), c.long(), 1.0 - wc, wc

    ox = x.to(f32) * lam + u.to(f32) - hUout + 0.5  # all terms exact in float32
    oy = y.to(f32) * lam + v.to(f32) - hVout + 0.5
    ou = ((u.to(torch.float64) + 0.5) / lam - 0.5).to(f32)  # computed in double, stored in a float
    ov = ((v.to(torch.float64) + 0.5) / lam - 0.5).to(f32)
    xf, xc, xwf, xwc = taps(ox)
    yf, yc, ywf, ywc = taps(oy)
    uf, uc, uwf, uwc = taps(ou)
    vf, vc, vwf, vwc = taps(ov)
    shape = (Vout, Uout, y.shape[-1])
    flat = X.reshape(N, -1)

    def get_pixel_val(yy, xx, vv, uu):
        # the kernel's test and index, split into the (v, y) and (u, x) parts that broadcast
        inside_vy = (yy >= 0) & (yy < Hin) & (vv >= 0) & (vv < Vin)  # (Vout, 1, K)
        inside_ux = (xx >= 0) & (xx < Win) & (uu >= 0) & (uu < Uin)  # (1, Uout, K)
        index_vy = vv.clamp(0, Vin - 1) * (Uin * Hin * Win) + yy.clamp(0, Hin - 1) * Win
        index_ux = uu.clamp(0, Uin - 1) * (Hin * Win) + xx.clamp(0, Win - 1)
        values = flat[:, (index_vy + index_ux).reshape(-1)].reshape(N, *shape)
        return torch.where(inside_vy & inside_ux, values, pad_val)

    val = None
    for wy, yy in ((ywf, yf), (ywc, yc)):
        for wx, xx in ((xwf, xf), (xwc, xc)):
            for wv, vv in ((vwf, vf), (vwc, vc)):
                for wu, uu in ((uwf, uf), (uwc, uc)):
                    term = (wy * wx * wv * wu).to(X.dtype) * get_pixel_val(yy, xx, vv, uu)
                    val = term if val is None else val + term
    if positions is not None:
        return val.reshape(N, Vout * Uout, -1)
    return val.reshape(N, Vout * Uout, Hout, Wout)


# ----------------------------------------------------------------------------- head
class TensorMaskHead(nn.Module):
    def __init__(self, num_levels=6, num_anchors=2, mask_sizes=(11, 15), in_channels=256, num_classes=80,
                 cls_channels=256, bbox_channels=128, mask_channels=128, num_convs=4):  # fmt: skip
        super().__init__()
        self.mask_sizes = list(mask_sizes)

        def subnet(channels):
            layers, cur = [], in_channels
            for _ in range(num_convs):
                layers += [nn.Conv2d(cur, channels, kernel_size=3, stride=1, padding=1), nn.ReLU()]
                cur = channels
            return nn.Sequential(*layers)

        self.cls_subnet = subnet(cls_channels)
        self.cls_score = nn.Conv2d(
            cls_channels, num_anchors * num_classes, kernel_size=3, stride=1, padding=1
        )
        self.bbox_subnet = subnet(bbox_channels)
        self.bbox_pred = nn.Conv2d(
            bbox_channels, num_anchors * 4, kernel_size=3, stride=1, padding=1
        )
        self.mask_subnet = subnet(mask_channels)
        for mask_size in self.mask_sizes:
            self.add_module(
                f"mask_pred_{mask_size:02d}",
                nn.Conv2d(mask_channels, mask_size * mask_size, 1, 1, 0),
            )
        self.lambdas = [2**lvl for lvl in range(num_levels)]  # SwapAlign2Nat(2**lvl) per level
        self.mask_fuse = nn.Sequential(nn.Conv2d(mask_channels, mask_channels, 3, 1, 1), nn.ReLU())

    def mask_features(self, features):
        """The bipyramid's fused mask features per level, all at the finest resolution."""
        mask_feats = [self.mask_subnet(x) for x in features]
        mask_feat_high_res = mask_feats[0]
        H, W = mask_feat_high_res.shape[-2:]
        mask_feats_up = []
        for lvl, mask_feat in enumerate(mask_feats):
            lambda_val = 2.0**lvl
            mask_feat_up = mask_feat
            if lvl > 0:
                mask_feat_up = F.interpolate(
                    mask_feat, scale_factor=lambda_val, mode="bilinear", align_corners=False
                )
            mask_feats_up.append(self.mask_fuse(mask_feat_up[:, :, :H, :W] + mask_feat_high_res))
        return mask_feats_up

    def forward(self, features):
        """-> pred_logits, pred_deltas per level, and pred_masks per level and mask size: the
        aligned (N, M*M, H_0, W_0) head tensors that Detectron2 feeds to SwapAlign2Nat(2**lvl).
        Detectron2 applies the op densely; `natural_masks` evaluates its per-element formula at the
        windows inference reads, which are the only outputs it ever uses."""
        pred_logits = [self.cls_score(self.cls_subnet(x)) for x in features]
        pred_deltas = [self.bbox_pred(self.bbox_subnet(x)) for x in features]
        pred_masks = [
            [
                getattr(self, f"mask_pred_{mask_size:02d}")(mask_feat)
                for mask_size in self.mask_sizes
            ]
            for mask_feat in self.mask_features(features)
        ]
        return pred_logits, pred_deltas, pred_masks

    def natural_masks(self, aligned: torch.Tensor, lvl: int, ys, xs) -> torch.Tensor:
        """SwapAlign2Nat(2**lvl)(aligned)[:, :, ys, xs] -> (N, Vout*Uout, K)."""
        return swap_align2nat(aligned, self.lambdas[lvl], -6.0, positions=(ys, xs))


# ----------------------------------------------------------------------------- the model
def permute_to_N_HWA_K(tensor, K):
    N, _, H, W = tensor.shape
    return tensor.view(N, -1, K, H, W).permute(0, 3, 4, 1, 2).reshape(N, -1, K)


def grid_anchors_with_indexes(grid_sizes, strides, sizes):
    """TensorMaskAnchorGenerator: anchors (shift 0, not stride/2) and (L, I, H, W, A) indexes."""
    anchors, indexes = [], []
    for lvl, ((grid_height, grid_width), stride, level_sizes) in enumerate(
        zip(grid_sizes, strides, sizes)
    ):
        base = torch.tensor(
            [[-s / 2, -s / 2, s / 2, s / 2] for s in level_sizes], dtype=torch.float32
        )
        shifts_x = torch.arange(0, grid_width * stride, step=stride, dtype=torch.float32)
        shifts_y = torch.arange(0, grid_height * stride, step=stride, dtype=torch.float32)
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=2)
        anchors.append((shifts[:, :, None, :] + base.view(1, 1, -1, 4)).view(-1, 4))
        grids = torch.meshgrid(
            torch.full((1,), lvl, dtype=torch.int64), torch.zeros((1,), dtype=torch.int64),
            torch.arange(0, grid_height, dtype=torch.int64), torch.arange(0, grid_width, dtype=torch.int64),
            torch.arange(0, base.shape[0], dtype=torch.int64), indexing="ij",
        )  # fmt: skip
        indexes.append(torch.stack(grids, dim=5).view(-1, 5))
    return torch.cat(anchors), torch.cat(indexes)


def apply_deltas(deltas, boxes, weights=BBOX_REG_WEIGHTS, scale_clamp=SCALE_CLAMP):
    deltas = deltas.float()
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = deltas[:, 2::4] / ww
    dh = deltas[:, 3::4] / wh
    dw = torch.clamp(dw, max=scale_clamp)
    dh = torch.clamp(dh, max=scale_clamp)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    x1 = pred_ctr_x - 0.5 * pred_w
    y1 = pred_ctr_y - 0.5 * pred_h
    x2 = pred_ctr_x + 0.5 * pred_w
    y2 = pred_ctr_y + 0.5 * pred_h
    return torch.stack((x1, y1, x2, y2), dim=-1).reshape(deltas.shape)


def _do_paste_mask(masks, boxes, img_h: int, img_w: int):
    """mask_ops._do_paste_mask with skip_empty=True (the CPU path)."""
    x0_int, y0_int = torch.clamp(boxes.min(dim=0).values.floor()[:2] - 1, min=0).to(
        dtype=torch.int32
    )
    x1_int = torch.clamp(boxes[:, 2].max().ceil() + 1, max=img_w).to(dtype=torch.int32)
    y1_int = torch.clamp(boxes[:, 3].max().ceil() + 1, max=img_h).to(dtype=torch.int32)
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
    N = masks.shape[0]
    img_y = torch.arange(y0_int, y1_int, dtype=torch.float32) + 0.5
    img_x = torch.arange(x0_int, x1_int, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    gx = img_x[:, None, :].expand(N, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(N, img_y.size(1), img_x.size(1))
    grid = torch.stack([gx, gy], dim=3)
    img_masks = F.grid_sample(masks, grid.to(masks.dtype), align_corners=False)
    return img_masks[:, 0], (slice(y0_int, y1_int), slice(x0_int, x1_int))


def paste_masks_in_image(masks, boxes, image_shape, threshold=0.5):
    N = len(masks)
    img_h, img_w = image_shape
    img_masks = torch.zeros(N, img_h, img_w, dtype=torch.bool)
    for inds in torch.chunk(torch.arange(N), N):  # CPU: one by one
        masks_chunk, spatial_inds = _do_paste_mask(
            masks[inds, None, :, :], boxes[inds], img_h, img_w
        )
        img_masks[(inds,) + spatial_inds] = masks_chunk >= threshold
    return img_masks


def paste_mask_lists_in_image(masks, boxes, image_shape, threshold=0.5):
    """arch._paste_mask_lists_in_image: masks of several sizes, pasted per size."""
    if len(masks) == 0:
        return torch.empty((0, 1) + tuple(image_shape), dtype=torch.uint8)
    img_masks, ind_masks = [], []
    mask_sizes = torch.tensor([m.shape[-1] for m in masks])
    for msize in torch.unique(mask_sizes).tolist():
        cur_ind = torch.where(mask_sizes == msize)[0]
        ind_masks.append(cur_ind)
        img_masks.append(
            paste_masks_in_image(
                torch.cat([masks[i] for i in cur_ind]), boxes[cur_ind], image_shape, threshold
            )
        )
    img_masks, ind_masks = torch.cat(img_masks), torch.cat(ind_masks)
    out = torch.empty_like(img_masks)
    out[ind_masks, :, :] = img_masks
    return out


class TensorMask(nn.Module):
    """Detectron2's TensorMask (BIPYRAMID_ON, ALIGNED_ON, R-50-FPN), inference only."""

    def __init__(self, num_classes=80, score_threshold=0.05, topk_candidates=6000, nms_threshold=0.5,
                 detections_im=100):  # fmt: skip
        super().__init__()
        self.num_classes, self.score_threshold = num_classes, score_threshold
        self.topk_candidates, self.nms_threshold, self.detections_im = (
            topk_candidates,
            nms_threshold,
            detections_im,
        )
        self.backbone = FPN(ResNet(50))
        self.strides = [4, 8, 16, 32, 64, 128]
        self.anchor_sizes = ANCHOR_SIZES
        self.mask_sizes = [size // self.strides[0] for size in ANCHOR_SIZES[0]]  # [11, 15]
        self.head = TensorMaskHead(
            len(ANCHOR_SIZES), len(ANCHOR_SIZES[0]), self.mask_sizes, num_classes=num_classes
        )
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)

    # -- input: DefaultPredictor + preprocess_image
    @staticmethod
    def get_output_shape(oldh, oldw, short_edge_length, max_size):
        h, w = oldh, oldw
        size = short_edge_length * 1.0
        scale = size / min(h, w)
        if h < w:
            newh, neww = size, scale * w
        else:
            newh, neww = scale * h, size
        if max(newh, neww) > max_size:
            scale = max_size * 1.0 / max(newh, neww)
            newh = newh * scale
            neww = neww * scale
        return int(newh + 0.5), int(neww + 0.5)

    def preprocess(self, image_rgb: np.ndarray, min_size: int, max_size: int):
        """RGB uint8 (H, W, 3) as a photo decodes -> (padded normalised (1, 3, Hp, Wp), (h, w))."""
        bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])  # read_image(format="BGR")
        newh, neww = self.get_output_shape(bgr.shape[0], bgr.shape[1], min_size, max_size)
        resized = np.asarray(Image.fromarray(bgr).resize((neww, newh), Image.BILINEAR))
        x = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        x = (x - self.pixel_mean) / self.pixel_std
        d = self.backbone.size_divisibility
        H, W = (newh + d - 1) // d * d, (neww + d - 1) // d * d
        return F.pad(x, [0, W - neww, 0, H - newh], value=0.0).unsqueeze_(0), (newh, neww)

    # -- the network
    def features(self, images):
        feats = self.backbone(images)
        return [feats[f] for f in ["p2", "p3", "p4", "p5", "p6", "p7"]]

    @torch.no_grad()
    def predict(self, image_rgb: np.ndarray, min_size: int = 800, max_size: int = 1333) -> dict:
        """One image end to end, as DefaultPredictor runs it: output at the image's own size."""
        images, image_size = self.preprocess(image_rgb, min_size, max_size)
        features = self.features(images)
        pred_logits, pred_deltas, pred_masks = self.head(features)
        return self.inference(pred_logits, pred_deltas, pred_masks, [f.shape[-2:] for f in features], image_size,
                              image_rgb.shape[:2])  # fmt: skip

    def inference(
        self, pred_logits, pred_deltas, pred_masks, grid_sizes, image_size, output_size, img_idx=0
    ):
        anchors, indexes = grid_anchors_with_indexes(grid_sizes, self.strides, self.anchor_sizes)
        logits = torch.cat([permute_to_N_HWA_K(x, self.num_classes) for x in pred_logits], dim=1)[
            img_idx
        ]
        deltas = torch.cat([permute_to_N_HWA_K(x, 4) for x in pred_deltas], dim=1)[img_idx]
        masks = [[mla[img_idx] for mla in ml] for ml in pred_masks]
        boxes, scores, classes, result_masks, result_anchors = self.inference_single_image(
            logits, deltas, masks, anchors, indexes
        )
        return self.postprocess(
            boxes, scores, classes, result_masks, result_anchors, image_size, *output_size
        )

    def inference_single_image(self, pred_logits, pred_deltas, pred_masks, anchors, indexes):
        pred_logits = pred_logits.flatten().sigmoid_()
        logits_top_idxs = torch.where(pred_logits > self.score_threshold)[0]
        num_topk = min(self.topk_candidates, logits_top_idxs.shape[0])
        pred_prob, topk_idxs = pred_logits[logits_top_idxs].sort(descending=True)
        pred_prob = pred_prob[:num_topk]
        top_idxs = logits_top_idxs[topk_idxs[:num_topk]]
        cls_idxs = top_idxs % self.num_classes
        top_idxs //= self.num_classes
        pred_boxes = apply_deltas(pred_deltas[top_idxs], anchors[top_idxs])
        keep = box_ops.batched_nms(pred_boxes.float(), pred_prob, cls_idxs, self.nms_threshold)
        keep = keep[: self.detections_im]
        result_indexes = indexes[top_idxs][keep]
        result_anchors = anchors[top_idxs][keep]
        result_masks = []
        for lvl, _, h, w, anc in result_indexes.tolist():
            cur_size = self.mask_sizes[anc] * (2**lvl)
            natural = self.head.natural_masks(pred_masks[lvl][anc][None], lvl, [h], [w])[
                0
            ]  # pred_masks[lvl][anc][:, h, w]
            result_masks.append(torch.sigmoid(natural.view(1, cur_size, cur_size)))
        return pred_boxes[keep], pred_prob[keep], cls_idxs[keep], result_masks, result_anchors

    @staticmethod
    def postprocess(boxes, scores, classes, result_masks, result_anchors, image_size, output_height, output_width,
                    mask_threshold=0.5):  # fmt: skip
        """arch._postprocess."""
        scale_x, scale_y = (output_width / image_size[1], output_height / image_size[0])
        boxes = boxes.clone()
        boxes[:, 0::2] *= scale_x
        boxes[:, 1::2] *= scale_y
        h, w = output_height, output_width
        boxes = torch.stack(
            (boxes[:, 0].clamp(min=0, max=w), boxes[:, 1].clamp(min=0, max=h),
             boxes[:, 2].clamp(min=0, max=w), boxes[:, 3].clamp(min=0, max=h)), dim=-1,
        )  # fmt: skip
        inds_nonempty = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
        anchors = result_anchors.clone()
        anchors[:, 0::2] *= scale_x
        anchors[:, 1::2] *= scale_y
        kept_masks = [x for (i, x) in zip(inds_nonempty.tolist(), result_masks) if i]
        masks = paste_mask_lists_in_image(kept_masks, anchors[inds_nonempty], (output_height, output_width),
                                          threshold=mask_threshold)  # fmt: skip
        return {"boxes": boxes[inds_nonempty], "scores": scores[inds_nonempty], "labels": classes[inds_nonempty],
                "masks": masks}  # fmt: skip


# ----------------------------------------------------------------------------- training targets
def get_deltas(src_boxes, target_boxes, weights=BBOX_REG_WEIGHTS):
    """Box2BoxTransform.get_deltas."""
    src_widths = src_boxes[:, 2] - src_boxes[:, 0]
    src_heights = src_boxes[:, 3] - src_boxes[:, 1]
    src_ctr_x = src_boxes[:, 0] + 0.5 * src_widths
    src_ctr_y = src_boxes[:, 1] + 0.5 * src_heights
    target_widths = target_boxes[:, 2] - target_boxes[:, 0]
    target_heights = target_boxes[:, 3] - target_boxes[:, 1]
    target_ctr_x = target_boxes[:, 0] + 0.5 * target_widths
    target_ctr_y = target_boxes[:, 1] + 0.5 * target_heights
    wx, wy, ww, wh = weights
    dx = wx * (target_ctr_x - src_ctr_x) / src_widths
    dy = wy * (target_ctr_y - src_ctr_y) / src_heights
    dw = ww * torch.log(target_widths / src_widths)
    dh = wh * torch.log(target_heights / src_heights)
    return torch.stack((dx, dy, dw, dh), dim=1)


def assignment_rule(gt_boxes, anchor_boxes, unit_lengths, min_anchor_size, scale_thresh=2.0, spatial_thresh=1.0,
                    uniqueness_on=True):  # fmt: skip
    """arch._assignment_rule: (matches (M,), match_labels (M,) int8: 1 fg, 0 bg, -1 ignored)."""
    N, M = gt_boxes.shape[0], anchor_boxes.shape[0]
    if N == 0 or M == 0:
        return gt_boxes.new_full((N,), 0, dtype=torch.int64), gt_boxes.new_full(
            (N,), -1, dtype=torch.int8
        )
    lt = torch.min(gt_boxes[:, None, :2], anchor_boxes[:, :2])
    rb = torch.max(gt_boxes[:, None, 2:], anchor_boxes[:, 2:])
    union = torch.cat([lt, rb], dim=2)
    anchor = torch.zeros_like(gt_boxes)[:, None, :] + anchor_boxes[:, :]
    contain_matrix = torch.all(union == anchor, dim=2)
    gt_size_lower = torch.max(gt_boxes[:, 2:] - gt_boxes[:, :2], dim=1)[0]
    gt_size_upper = gt_size_lower * scale_thresh
    gt_size_upper[gt_size_upper < min_anchor_size] = min_anchor_size
    anchor_size = torch.max(anchor_boxes[:, 2:] - anchor_boxes[:, :2], dim=1)[0] - unit_lengths
    size_diff_upper = gt_size_upper[:, None] - anchor_size
    scale_matrix = size_diff_upper >= 0
    gt_center = (gt_boxes[:, 2:] + gt_boxes[:, :2]) / 2
    anchor_center = (anchor_boxes[:, 2:] + anchor_boxes[:, :2]) / 2
    offset_center = gt_center[:, None, :] - anchor_center[:, :]
    offset_center /= unit_lengths[:, None]
    spatial_square = spatial_thresh * spatial_thresh
    spatial_matrix = torch.sum(offset_center * offset_center, dim=2) <= spatial_square
    assign_matrix = (contain_matrix & scale_matrix & spatial_matrix).int()
    matched_vals, matches = assign_matrix.max(dim=0)
    match_labels = matches.new_full(matches.size(), 1, dtype=torch.int8)
    match_labels[matched_vals == 0] = 0
    match_labels[matched_vals == 1] = 1
    not_unique_idxs = assign_matrix.sum(dim=0) > 1
    match_labels[not_unique_idxs] = 0 if uniqueness_on else -1
    return matches, match_labels


def crop_and_resize(bitmasks: torch.Tensor, boxes: torch.Tensor, mask_size: int) -> torch.Tensor:
    """BitMasks.crop_and_resize: (N, H, W) masks, (N, 4) boxes -> (N, mask_size, mask_size) bool."""
    from torchvision.ops import roi_align

    batch_inds = torch.arange(len(boxes)).to(dtype=boxes.dtype)[:, None]
    rois = torch.cat([batch_inds, boxes], dim=1)
    output = roi_align(
        bitmasks.to(torch.float32)[:, None], rois, (mask_size, mask_size), 1.0, 0, aligned=True
    )
    return output.squeeze(1) >= 0.5


def ground_truth(model: TensorMask, grid_sizes, gt_boxes, gt_classes, gt_bitmasks):
    """TensorMask.get_ground_truth for one image whose annotations went through DatasetMapper
    (crowd regions and empty boxes already gone). -> gt_classes_i (M,) (K = negative), the
    foreground anchors' indexes (F, 5) and deltas (F, 4), and per (level, anchor) the mask targets."""
    anchors, indexes = grid_anchors_with_indexes(grid_sizes, model.strides, model.anchor_sizes)
    unit_lengths = torch.cat(
        [torch.full((h * w * len(s),), st, dtype=torch.float32) for (h, w), st, s in
         zip(grid_sizes, model.strides, model.anchor_sizes)]
    )  # fmt: skip
    min_anchor_size = min(model.anchor_sizes[0]) - model.strides[0]
    gt_classes_i = torch.full_like(unit_lengths, model.num_classes, dtype=torch.int64)
    masks = {}
    if len(gt_boxes) == 0:
        return gt_classes_i, indexes[:0], torch.zeros((0, 4)), masks
    gt_matched_inds, anchor_labels = assignment_rule(
        gt_boxes, anchors, unit_lengths, min_anchor_size
    )
    fg_inds = anchor_labels == 1
    fg_anchors = anchors[fg_inds]
    gt_fg_matched_inds = gt_matched_inds[fg_inds]
    gt_classes_i[fg_inds] = gt_classes[gt_fg_matched_inds]
    gt_classes_i[anchor_labels == -1] = -1
    deltas = get_deltas(fg_anchors, gt_boxes[gt_fg_matched_inds])
    matched_indexes = indexes[fg_inds, :]
    for lvl in range(len(model.strides)):
        for anc in range(len(model.mask_sizes)):
            sel = (matched_indexes[:, 0] == lvl) & (matched_indexes[:, 4] == anc)
            if torch.any(sel):
                size = model.mask_sizes[anc] * 2**lvl
                masks[(lvl, anc)] = (
                    crop_and_resize(gt_bitmasks[gt_fg_matched_inds[sel]], fg_anchors[sel], size),
                    matched_indexes[sel, 2:4],
                )
    return gt_classes_i, matched_indexes, deltas, masks

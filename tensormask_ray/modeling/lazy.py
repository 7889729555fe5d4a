"""The mask branch computed only where windows read it: at inference the windows that survive NMS,
in training the positive windows (the only ones the mask loss sees).

Dense, every level's mask head tensor (N, V', U', H, W) covers the whole map, then the window op
turns all of it into natural masks: for the bipyramid six levels of fusion conv and conv+reshape
at the finest resolution. A `LazyMasks` keeps the mask tower's features instead and computes the
head tensor on crops: `decode_lazy` takes the windows to decode, finds the rows and columns each
reads (`WindowOp.footprints`), plans crops that hold them (`plan_crops`), runs the head on each
crop and decodes the windows from it (`decode_windows` with an origin). The logits equal the dense
op's at those windows, and autograd runs through it all, so training can use it too.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from .window_op import decode_windows
from .windows import WindowGroup

# Per-crop cost, in positions of the crop: the fixed work of one more crop (its conv calls and
# window gathers) against computing that many more positions in a merged crop.
CROP_OVERHEAD = 16


class LazyMasks:
    """The mask head's output, computed on demand on crops of its per-level tensors.

    Subclasses say what a crop of level k's head tensor is: `features` (the mask features the
    head's last 1x1 conv+reshape reads, on the crop) and `halo` (how many positions around the
    crop those features read from the mask tower's output, for the crop cost)."""

    halo = 0

    def __init__(
        self, mask_preds: nn.ModuleList, coarse_sizes: list[int], mask_feats: list[torch.Tensor]
    ):
        self.mask_preds, self.coarse_sizes = mask_preds, list(coarse_sizes)
        self.mask_feats = mask_feats  # per level (N, C, H_k, W_k), the mask tower's output

    def bounds(self, k: int) -> tuple[int, int]:
        """(H, W) of level k's full head tensor."""
        raise NotImplementedError

    def features(
        self, k: int, image: int, rows: tuple[int, int], cols: tuple[int, int]
    ) -> torch.Tensor:
        """Level k's mask features of one image on rows [r0, r1) x cols [c0, c1): (1, C, r1 - r0, c1 - c0)."""
        raise NotImplementedError

    def dense_features(self, k: int) -> torch.Tensor:
        """Level k's mask features on the whole map, (N, C, H, W)."""
        raise NotImplementedError

    def head_crop(self, feats: torch.Tensor, size_index: int) -> torch.Tensor:
        """(N, C, h, w) mask features (a crop or the whole map) -> the head tensor (N, V', U', h, w)
        of one window size on them: the 1x1 conv+reshape."""
        N, _, h, w = feats.shape
        c = self.coarse_sizes[size_index]
        return self.mask_preds[size_index](feats).view(N, c, c, h, w)

    def dense(self, k: int, size_index: int) -> torch.Tensor:
        """The full head tensor of level k and one window size (N, V', U', H, W), as the dense head gives it."""
        return self.head_crop(self.dense_features(k), size_index)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters between the mask tower's output and the head tensors."""
        return self.mask_preds.parameters()

    def zero_in_graph(self) -> torch.Tensor:
        """0 that depends on the mask features and every parameter after them: added to a loss, it
        gives every mask-branch parameter a gradient (zero where no window reads it), as DDP needs."""
        total = sum(f.sum() for f in self.mask_feats) + sum(p.sum() for p in self.head_parameters())
        return total * 0.0


class LazyPyramidMasks(LazyMasks):
    """The feature-pyramid heads' (Fig. 7a) mask output: level k's head tensor is the 1x1
    conv+reshape of the mask tower's output at level k, so a crop reads only the crop."""

    def bounds(self, k: int) -> tuple[int, int]:
        return tuple(self.mask_feats[k].shape[-2:])

    def features(
        self, k: int, image: int, rows: tuple[int, int], cols: tuple[int, int]
    ) -> torch.Tensor:
        (r0, r1), (c0, c1) = rows, cols
        return self.mask_feats[k][image : image + 1, :, r0:r1, c0:c1]

    def dense_features(self, k: int) -> torch.Tensor:
        return self.mask_feats[k]


def plan_crops(
    foot: torch.Tensor, bounds: tuple[int, int], halo: int, overhead: int = CROP_OVERHEAD
) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    """Crops that together hold every window's footprint, each footprint inside one crop.

    foot (D, 4) [r0, r1, c0, c1): the footprints (WindowOp.footprints) in a map of `bounds` (H, W).
    A crop of h x w positions costs (h + 2 halo)(w + 2 halo) clipped to the map, plus `overhead`.
    Greedy: start from the distinct footprints and merge the pair whose bounding box saves the most
    cost, while a merge saves any; so windows of one object share a crop, far-apart ones do not.
    Returns [(indices into foot (D_c,), (r0, r1, c0, c1))]."""
    H, W = bounds
    boxes, member_of = np.unique(foot.cpu().numpy().astype(np.int64), axis=0, return_inverse=True)
    member_of = member_of.reshape(-1)

    def cost(b: np.ndarray) -> np.ndarray:  # (..., 4) -> (...)
        rows = np.minimum(b[..., 1] + halo, H) - np.maximum(b[..., 0] - halo, 0)
        cols = np.minimum(b[..., 3] + halo, W) - np.maximum(b[..., 2] - halo, 0)
        return rows * cols + overhead

    alive = np.ones(len(boxes), dtype=bool)
    while alive.sum() > 1:
        idx = np.flatnonzero(alive)
        b = boxes[idx]
        union = np.stack(
            [
                np.minimum(b[:, None, 0], b[None, :, 0]),
                np.maximum(b[:, None, 1], b[None, :, 1]),
                np.minimum(b[:, None, 2], b[None, :, 2]),
                np.maximum(b[:, None, 3], b[None, :, 3]),
            ],
            axis=-1,
        )  # (n, n, 4)
        c = cost(b)
        saving = c[:, None] + c[None, :] - cost(union)  # (n, n)
        np.fill_diagonal(saving, -1)
        i, j = np.unravel_index(np.argmax(saving), saving.shape)
        if saving[i, j] < 0:
            break
        boxes[idx[i]] = union[i, j]
        alive[idx[j]] = False
        member_of[member_of == idx[j]] = idx[i]
    return [
        (np.flatnonzero(member_of == b), tuple(int(v) for v in boxes[b]))
        for b in np.flatnonzero(alive)
    ]


def decode_lazy(
    masks: LazyMasks,
    groups: list[WindowGroup],
    group: torch.Tensor,
    image: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    pad_value: float,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Natural-mask logits of D windows: group (D,) window-group indices, image (D,) batch
    indices, ys, xs (D,) positions on their group's window grid. Per level and image, the head
    runs on the crops plan_crops chooses and each window is decoded from its crop.

    Yields (gi, sel, logits): windows `sel` (D_c,) (indices into the inputs), all of group gi,
    and their logits (D_c, Vo, Uo), equal to groups[gi].op.dense(head tensor)[image, :, :, ys, xs].
    Every window is in exactly one yield."""
    if group.numel() == 0:
        return
    device = ys.device
    zero = torch.zeros((), dtype=torch.long, device=device)
    level_of = torch.tensor([g.k for g in groups], device=device)[group]  # (D,)
    pairs = torch.stack([level_of, image.to(device)], dim=1).unique(dim=0).tolist()
    for k, i in pairs:
        H, W = masks.bounds(k)
        here = ((level_of == k) & (image == i)).nonzero(as_tuple=True)[0]  # (D_ki,)
        foot = torch.empty((here.numel(), 4), dtype=torch.long, device=device)  # [r0, r1, c0, c1)
        for gi in group[here].unique().tolist():
            mine = group[here] == gi
            foot[mine] = groups[gi].op.footprints(ys[here][mine], xs[here][mine], (H, W)).long()
        for members, (r0, r1, c0, c1) in plan_crops(foot, (H, W), masks.halo):
            members = here[torch.as_tensor(members, device=device)]
            feats = masks.features(k, i, (r0, r1), (c0, c1))  # (1, C, r1 - r0, c1 - c0)
            for gi in group[members].unique().tolist():
                g = groups[gi]
                sel = members[group[members] == gi]
                x = masks.head_crop(feats, g.size_index)  # (1, V', U', r1 - r0, c1 - c0)
                logits = decode_windows(
                    x,
                    g.op,
                    zero.expand(sel.numel()),
                    ys[sel],
                    xs[sel],
                    pad_value,
                    origin=(r0, c0),
                    bounds=(H, W),
                )  # (D_c, Vo, Uo)
                yield gi, sel, logits

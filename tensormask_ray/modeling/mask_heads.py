"""The mask heads of Fig. 6 (paper §4.1), one class each.

Every head ends in a 1x1 conv whose V'U' channels are reshaped to a (N, V', U', H, W) tensor per
window size V (`coarse_size`: V' = V, or V/upscale_factor for the upscale heads), and turns that
tensor into each window group's natural masks (N, Vo, Uo, Hg, Wg) by a `WindowOp` (window_op.py:
the same op decodes densely with the fused kernels and sparsely at chosen windows):

- `SimpleNatural` (Fig. 6a): the tensor is already natural: Vo = V, read in place.
- `SimpleAligned` (Fig. 6b): the tensor is aligned: align2nat (alpha 1).
- `UpscaleNatural` (Fig. 6c): coarse natural masks (V/lambda) resized to V.
- `UpscaleAligned` (Fig. 6d): coarse aligned masks, up_align2nat to V (paper's default lambda 2).
- the tensor bipyramid (Fig. 7b, Fig. 8): `bipyramid.Bipyramid`, with its fusion and lazy decode.

All feature-pyramid heads have sigma_VU = sigma_HW (one mask cell per stride of the level:
`cell_size`), so their masks have V x V cells of 2^l pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from .bipyramid import Bipyramid
from .window_op import WindowOp


class MaskHead(Protocol):
    """What the model needs of a Fig. 6 head, per (level l = min_level + k, window size V)."""

    name: ClassVar[str]

    def coarse_size(self, window_size: int) -> int:
        """V' (= U'): the side of the tensor its conv+reshape produces for window size V."""

    def window_op(self, window_size: int, k: int) -> WindowOp:
        """How level k's (N, V', U', H, W) tensor becomes natural windows (N, Vo, Uo, Hg, Wg)."""

    def cell_size(self, level: int, min_level: int) -> int:
        """sigma_VU: image pixels per mask cell at level l."""


@dataclass(frozen=True)
class _FeaturePyramidHead:
    """Fig. 7a: one mask per window of V x V cells of the level's stride."""

    geometry: str  # "paper" | "detectron2" (model.geometry)

    def coarse_size(self, window_size: int) -> int:
        return window_size

    def cell_size(self, level: int, min_level: int) -> int:
        return 2**level


@dataclass(frozen=True)
class SimpleNatural(_FeaturePyramidHead):
    name: ClassVar[str] = "simple_natural"

    def window_op(self, window_size: int, k: int) -> WindowOp:
        return WindowOp((window_size, window_size), natural=True)


@dataclass(frozen=True)
class SimpleAligned(_FeaturePyramidHead):
    name: ClassVar[str] = "simple_aligned"

    def window_op(self, window_size: int, k: int) -> WindowOp:
        # geometry "detectron2": Detectron2's SwapAlign2Nat at lam 1
        return WindowOp((window_size, window_size), alpha=1, geometry=self.geometry)


@dataclass(frozen=True)
class _UpscaleHead(_FeaturePyramidHead):
    upscale_factor: float  # lambda: V' = V / lambda (model.upscale_factor)
    upscale_mode: str  # "bilinear" | "nearest" (model.upscale_mode)

    def __post_init__(self):
        if self.geometry != "paper":
            raise ValueError(
                f"{self.name} has no Detectron2 counterpart (geometry {self.geometry!r})"
            )

    def coarse_size(self, window_size: int) -> int:
        return int(round(window_size / self.upscale_factor))


@dataclass(frozen=True)
class UpscaleNatural(_UpscaleHead):
    name: ClassVar[str] = "upscale_natural"

    def window_op(self, window_size: int, k: int) -> WindowOp:
        return WindowOp((window_size, window_size), natural=True, mode=self.upscale_mode)


@dataclass(frozen=True)
class UpscaleAligned(_UpscaleHead):
    name: ClassVar[str] = "upscale_aligned"

    def window_op(self, window_size: int, k: int) -> WindowOp:
        return WindowOp((window_size, window_size), alpha=1, mode=self.upscale_mode)


MASK_HEADS = {
    h.name: h for h in (SimpleNatural, SimpleAligned, UpscaleNatural, UpscaleAligned, Bipyramid)
}


def build_mask_head(name: str, upscale_factor: float, upscale_mode: str, geometry: str) -> MaskHead:
    """The config's `model.mask_head` and its settings -> the head."""
    if name not in MASK_HEADS:
        raise ValueError(f"unknown mask head {name!r}; one of {sorted(MASK_HEADS)}")
    if name.startswith("upscale_"):
        return MASK_HEADS[name](geometry, upscale_factor, upscale_mode)
    return MASK_HEADS[name](geometry)

"""The TensorMask model (paper §3-§4): backbone, FPN, heads, bipyramid, assignment, losses,
inference. `build_model(cfg)` is the entry point.

The model's names load on first use (PEP 562), so importing a light submodule such as
`modeling.checkpoint_file` (what the training driver, Ray Train's controller and a sweep's trial
actor need) does not import the network and torchvision with it: about 1.4 s of CPU per process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tensormask import TensorMask, build_model

__all__ = ["TensorMask", "build_model"]


def __getattr__(name: str):
    if name in __all__:
        from . import tensormask

        return getattr(tensormask, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

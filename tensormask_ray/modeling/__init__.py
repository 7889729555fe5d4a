"""The TensorMask model (paper §3-§4): backbone, FPN, heads, bipyramid, assignment, losses,
inference. `build_model(cfg)` is the entry point."""

from .tensormask import TensorMask, build_model

__all__ = ["TensorMask", "build_model"]

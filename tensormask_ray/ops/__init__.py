"""TensorMask's 4-D tensor ops (paper §3): align2nat, nat2align, up_align2nat, swap_align2nat.

See `api` for the semantics, `reference` for the pure-PyTorch ground truth, `library` for the
operator registration of the fused kernels in csrc/.
"""

from .api import align2nat, backend, nat2align, swap_align2nat, up_align2nat

__all__ = ["align2nat", "backend", "nat2align", "swap_align2nat", "up_align2nat"]

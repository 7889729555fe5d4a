"""Operator registration of the fused kernels: loads `tensormask_ray._C` and adds what Python is best
at to the `tensormask::*` operators declared in csrc/tensormask_ops.cpp:

- `torch.library.register_fake` for every op (forward and backward): output shapes for FakeTensor,
  torch.compile and torch.export;
- `torch.library.register_autograd` for the five forward ops, whose backward is the matching
  registered `*_backward` op (a deterministic gather kernel). The backward ops themselves are not
  differentiable (first derivatives only).

`ensure_loaded()` is idempotent and is called by `ops.api` on first use of the fused backend.
"""

from __future__ import annotations

import threading

import torch

_LOCK = threading.Lock()
_LOADED = False

OPS = ("align2nat", "nat2align", "up_align2nat", "swap_align2nat", "swap_align2nat_detectron2")
BACKWARD_OPS = tuple(f"{name}_backward" for name in OPS)

_BUILD_HINT = (
    "Build it with `make install` (or `pip install --no-build-isolation -e .` with CUDA_HOME set "
    "for the CUDA kernels), or opt in to the slow pure-PyTorch references explicitly with "
    "TENSORMASK_OPS=reference."
)


def ensure_loaded() -> None:
    """Loads the compiled extension once and registers fake and autograd implementations.

    Raises ImportError naming the problem (and how to build, or opt in to the references) if the
    extension is missing or fails to load.
    """
    global _LOADED
    if _LOADED:
        return
    with _LOCK:
        if _LOADED:
            return
        try:
            import tensormask_ray._C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)
        except ImportError as e:
            raise ImportError(
                f"tensormask_ray._C, the compiled TensorMask ops, could not be loaded ({e}). "
                + _BUILD_HINT
            ) from e
        missing = [name for name in OPS + BACKWARD_OPS if not hasattr(torch.ops.tensormask, name)]
        if missing:
            raise ImportError(
                f"tensormask_ray._C loaded but does not define torch.ops.tensormask.{missing}: "
                "it is stale. " + _BUILD_HINT
            )
        _register_fakes()
        _register_autograd()
        _LOADED = True


def _swap_shape(shape, lam: int) -> list:
    N, V, U, H, W = shape
    return [N, lam * V, lam * U, (H + lam - 1) // lam, (W + lam - 1) // lam]


def _check_5d(x: torch.Tensor, op: str) -> None:
    torch._check(
        x.dim() == 5, lambda: f"{op}: expected a 5-D (N, V, U, H, W) tensor, got {x.dim()}-D"
    )
    torch._check(
        x.is_floating_point(), lambda: f"{op}: expected a floating-point tensor, got {x.dtype}"
    )


def _register_fakes() -> None:
    def _same_shape(op: str):
        def fake(x, alpha, pad_value):
            _check_5d(x, op)
            torch._check(alpha >= 1, lambda: f"{op}: alpha must be >= 1, got {alpha}")
            return x.new_empty(x.shape)

        return fake

    def _same_shape_backward(op: str):
        def fake(grad, alpha):
            _check_5d(grad, op)
            return grad.new_empty(grad.shape)

        return fake

    torch.library.register_fake("tensormask::align2nat", _same_shape("align2nat"))
    torch.library.register_fake("tensormask::nat2align", _same_shape("nat2align"))
    torch.library.register_fake(
        "tensormask::align2nat_backward", _same_shape_backward("align2nat_backward")
    )
    torch.library.register_fake(
        "tensormask::nat2align_backward", _same_shape_backward("nat2align_backward")
    )

    @torch.library.register_fake("tensormask::up_align2nat")
    def _(x, out_v, out_u, mode, pad_value):
        _check_5d(x, "up_align2nat")
        torch._check(out_v >= 1 and out_u >= 1, lambda: "up_align2nat: out_v, out_u must be >= 1")
        torch._check(mode in ("bilinear", "nearest"), lambda: f"up_align2nat: bad mode {mode!r}")
        N, _, _, H, W = x.shape
        return x.new_empty((N, out_v, out_u, H, W))

    @torch.library.register_fake("tensormask::up_align2nat_backward")
    def _(grad, input_shape, mode):
        _check_5d(grad, "up_align2nat_backward")
        return grad.new_empty(input_shape)

    for name in ("swap_align2nat", "swap_align2nat_detectron2"):

        def fake_swap(x, lam, pad_value, op=name):
            _check_5d(x, op)
            torch._check(lam >= 1, lambda: f"{op}: lam must be >= 1, got {lam}")
            return x.new_empty(_swap_shape(x.shape, lam))

        def fake_swap_backward(grad, input_shape, lam, op=f"{name}_backward"):
            _check_5d(grad, op)
            return grad.new_empty(input_shape)

        torch.library.register_fake(f"tensormask::{name}", fake_swap)
        torch.library.register_fake(f"tensormask::{name}_backward", fake_swap_backward)


def _register_autograd() -> None:
    ops = torch.ops.tensormask

    # align2nat / nat2align: (x, alpha, pad_value)
    def _setup_alpha(ctx, inputs, output):
        ctx.alpha = inputs[1]

    def _align2nat_backward(ctx, grad):
        return ops.align2nat_backward(grad, ctx.alpha), None, None

    def _nat2align_backward(ctx, grad):
        return ops.nat2align_backward(grad, ctx.alpha), None, None

    torch.library.register_autograd(
        "tensormask::align2nat", _align2nat_backward, setup_context=_setup_alpha
    )
    torch.library.register_autograd(
        "tensormask::nat2align", _nat2align_backward, setup_context=_setup_alpha
    )

    # up_align2nat: (x, out_v, out_u, mode, pad_value)
    def _setup_up(ctx, inputs, output):
        ctx.input_shape = inputs[0].shape
        ctx.mode = inputs[3]

    def _up_backward(ctx, grad):
        return ops.up_align2nat_backward(grad, ctx.input_shape, ctx.mode), None, None, None, None

    torch.library.register_autograd(
        "tensormask::up_align2nat", _up_backward, setup_context=_setup_up
    )

    # swap_align2nat: (x, lam, pad_value)
    def _setup_swap(ctx, inputs, output):
        ctx.input_shape = inputs[0].shape
        ctx.lam = inputs[1]

    def _swap_backward(ctx, grad):
        return ops.swap_align2nat_backward(grad, ctx.input_shape, ctx.lam), None, None

    def _swap_detectron2_backward(ctx, grad):
        grad_x = ops.swap_align2nat_detectron2_backward(grad, ctx.input_shape, ctx.lam)
        return grad_x, None, None

    torch.library.register_autograd(
        "tensormask::swap_align2nat", _swap_backward, setup_context=_setup_swap
    )
    torch.library.register_autograd(
        "tensormask::swap_align2nat_detectron2",
        _swap_detectron2_backward,
        setup_context=_setup_swap,
    )

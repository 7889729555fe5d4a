"""A stand-in accelerator for CPU-only CI: a forgotten `.to(device)` fails here as it would on a GPU.

`stand_in_device()` is a context manager yielding a device, `DEVICE` (torch's "meta" device
type). Inside it, a tensor moved or created there (`.to(DEVICE)`, `torch.zeros(..., device=DEVICE)`,
`model.to(DEVICE)`, `torch.tensor(data, device=x.device)`) is a `StandIn`: a tensor that reports
`device == DEVICE` and holds real values in a CPU tensor underneath, so every op computes what
it computes on the CPU, `.item()`, `.tolist()`, NMS and pycocotools work, and a whole path
(training step, validation, inference) runs to the end with results comparable to a CPU run.

Like CUDA, an op that mixes a stand-in tensor with a CPU tensor raises `DeviceMismatch`, except
where CUDA allows it: CPU 0-dim tensors (scalars), CPU index tensors of advanced indexing, and
cross-device copies (`copy_`, `.to`, `.cpu()`). `.numpy()` of a stand-in tensor raises as it does
for a CUDA tensor. Not supported: `torch.inference_mode` (a wrapper cannot be an inference tensor;
use no_grad) and anything that needs a real device type (autocast, streams, generators).

Why not the plain meta device or FakeTensorMode with a fake "cuda" device: both check device
agreement, but have no values, so they stop at the first data-dependent op (target assignment,
`nonzero`, top-k, NMS, `.item()`), i.e. within the first stage of every path we need to cover.
Why "meta" as the device type it reports: the autograd engine routes work per device type and
runs meta like the CPU; a reported "cuda" device would need a CUDA runtime for backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
aten = torch.ops.aten

# Ops that accept CPU index tensors with a tensor on the device as `self` (CUDA moves them).
_CPU_INDICES_OK = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}
_CROSS_DEVICE = {aten.copy_.default, aten._to_copy.default}


class DeviceMismatch(RuntimeError):
    """A CPU tensor met a tensor on the device in one op (CUDA raises a RuntimeError here too)."""


class StandIn(torch.Tensor):
    """A tensor on the stand-in device: reports `DEVICE`, computes with `inner` (on the CPU)."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(
            cls, inner.size(), strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, layout=inner.layout, device=DEVICE, requires_grad=inner.requires_grad,
        )  # fmt: skip
        r.inner = inner
        return r

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"StandIn({self.inner!r})"

    def tolist(self):
        return self.inner.tolist()

    def numpy(self, *, force: bool = False):
        raise TypeError(
            f"can't convert {DEVICE.type} (stand-in accelerator) device type tensor to numpy. "
            "Use Tensor.cpu() to copy the tensor to host memory first."
        )

    def __array__(self, dtype=None, copy=None):
        self.numpy()

    def __reduce_ex__(self, protocol):
        # torch.save of a tensor on the device: saved as its values (loading maps to the CPU).
        return self.inner.__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _on_device(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


def _check_devices(func, args, tensors: list[torch.Tensor]) -> None:
    index_ids: set[int] = set()
    if func in _CPU_INDICES_OK:
        index_ids = {id(t) for t in tree_flatten(args[1])[0] if isinstance(t, torch.Tensor)}
    for t in tensors:
        if isinstance(t, StandIn) or t.dim() == 0 or id(t) in index_ids:
            continue
        raise DeviceMismatch(
            f"{func}: Expected all tensors to be on the same device, but found at least two devices, "
            f"{DEVICE.type} (the stand-in accelerator) and {t.device}! (a {t.device} tensor of shape {tuple(t.shape)})"
        )


def _wrap(x):
    return StandIn(x) if isinstance(x, torch.Tensor) and not isinstance(x, StandIn) else x


def _dispatch(func, args, kwargs):
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    on_device = any(isinstance(t, StandIn) for t in tensors)
    if any(not isinstance(t, StandIn) and t.device.type == DEVICE.type for t in tensors):
        raise AssertionError(f"{func}: a data-less meta tensor reached the stand-in device")
    device_kwarg = kwargs.get("device")
    if not on_device and not _on_device(device_kwarg):
        return func(*args, **kwargs)  # nothing on the device: an ordinary CPU op
    if on_device and func not in _CROSS_DEVICE:
        _check_devices(func, args, tensors)

    def unwrap(x):
        return x.inner if isinstance(x, StandIn) else x

    inner_kwargs = tree_map(unwrap, kwargs)
    if device_kwarg is not None:
        inner_kwargs["device"] = torch.device("cpu")
    out = func(*tree_map(unwrap, args), **inner_kwargs)

    if func is aten.copy_.default:
        return args[0]
    if func is aten._local_scalar_dense.default:
        return out
    if device_kwarg is not None and not _on_device(device_kwarg):
        return out  # to the CPU (`.cpu()`, `.to("cpu")`, a factory with device="cpu")
    if func is aten._to_copy.default and device_kwarg is None and not isinstance(args[0], StandIn):
        return out  # a dtype change of a CPU tensor
    schema = func._schema
    if (
        schema.is_mutable
        and args
        and isinstance(args[0], StandIn)
        and schema.returns
        and schema.returns[0].alias_info
    ):
        return args[0]  # in-place ops return their own (wrapped) self
    return tree_map(_wrap, out)


class _DeviceDispatch(TorchDispatchMode):
    """Catches factory calls with device=DEVICE (no tensor argument to dispatch on)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


class _DataFactories(TorchFunctionMode):
    """`torch.tensor(data, device=meta)` and friends build a data-less meta tensor without going
    through the dispatcher: build them on the CPU instead, then move them to the device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _on_device(kwargs.get("device")):
            return func(*args, **{**kwargs, "device": "cpu"}).to(DEVICE)
        if func is torch.Tensor.new_tensor:
            device = kwargs.get("device", args[0].device)
            if _on_device(device):
                dtype = kwargs.get("dtype", args[0].dtype)
                return (
                    torch.tensor(args[1], dtype=dtype)
                    .to(DEVICE)
                    .requires_grad_(kwargs.get("requires_grad", False))
                )
        return func(*args, **kwargs)


@contextlib.contextmanager
def stand_in_device() -> Iterator[torch.device]:
    """Inside: tensors on `DEVICE` are `StandIn`s (see the module docstring)."""
    with _DataFactories(), _DeviceDispatch():
        yield DEVICE


def on_device(t: torch.Tensor) -> bool:
    return isinstance(t, StandIn)


__all__ = ["DEVICE", "DeviceMismatch", "StandIn", "on_device", "stand_in_device"]

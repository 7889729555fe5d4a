"""How the CPU kernels allocate their outputs: large outputs and grad_x are advised as huge pages
(csrc/cpu/cpu_kernels.h, empty_output), and that advice leaves every value as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tensormask_ray.ops import reference as ref

from ._cases import rand, requires_ext, run_child

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = [
    requires_ext,
    pytest.mark.skipif(
        not Path("/proc/self/smaps").exists() or not THP.exists(),
        reason="needs Linux with transparent huge pages (/proc/self/smaps, madvise)",
    ),
]

HUGE = 2 << 20
# (N, V, U, H, W) and lam: an output and a grad_x of 15*15 * 96*100 floats (8.6 MB) each.
SHAPE, LAM = (1, 15, 15, 96, 100), 2


def vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def interior(t: torch.Tensor) -> int:
    """An address in the 2 MiB-aligned interior of t's bytes."""
    begin = t.data_ptr()
    lo = -(-begin // HUGE) * HUGE
    assert lo + HUGE <= begin + t.numel() * t.element_size()
    return lo


def outputs():
    ops = torch.ops.tensormask
    x = rand(SHAPE, torch.float32, seed=3)
    out = ops.swap_align2nat(x, LAM, -6.0)
    grad_x = ops.swap_align2nat_backward(torch.ones_like(out), list(SHAPE), LAM)
    return x, out, grad_x


def test_large_outputs_are_advised_as_huge_pages():
    """'hg' (MADV_HUGEPAGE) in the VmFlags of the output's and grad_x's mappings."""
    _, out, grad_x = outputs()
    assert "hg" in vm_flags(interior(out))
    assert "hg" in vm_flags(interior(grad_x))


def test_advised_outputs_equal_the_reference():
    """The same values as the pure-PyTorch reference, forward and backward, at the large size."""
    x, out, grad_x = outputs()
    xr = x.double().requires_grad_(True)
    expected = ref.swap_align2nat(xr, LAM, -6.0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    (expected_grad,) = torch.autograd.grad(expected, xr, torch.ones_like(expected))
    torch.testing.assert_close(grad_x.double(), expected_grad, rtol=1e-6, atol=1e-6)


_CHILD = r"""
import torch
from tests.ops.test_ops_memory import interior, outputs, vm_flags
_, out, grad_x = outputs()
print("hg" in vm_flags(interior(out)), "hg" in vm_flags(interior(grad_x)))
"""


def test_hugepages_env_switch_turns_the_advice_off():
    stdout = run_child(_CHILD, {"TENSORMASK_CPU_HUGEPAGES": "0"})
    assert stdout.split() == ["False", "False"]

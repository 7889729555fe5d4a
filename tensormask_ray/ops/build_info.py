"""Reports what the built extension provides: `python -m tensormask_ray.ops.build_info`.

Prints, per operator, whether a CPU and a CUDA kernel are registered, and the torch / CUDA
versions. Exits non-zero if `tensormask_ray._C` does not load, lacks a CPU kernel, or was built
with CUDA but lacks a CUDA kernel. On a machine without a GPU the CUDA column still shows whether
the CUDA kernels were compiled and linked in.
"""

from __future__ import annotations

import sys

import torch

from .library import BACKWARD_OPS, OPS, ensure_loaded


def kernel_table() -> dict[str, dict[str, bool]]:
    """{op name: {"CPU": registered, "CUDA": registered}} for every tensormask op."""
    table = {}
    for name in OPS + BACKWARD_OPS:
        qualified = f"tensormask::{name}"
        table[name] = {
            key: bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key))
            for key in ("CPU", "CUDA")
        }
    return table


def main() -> int:
    print(
        f"torch {torch.__version__} (built with CUDA {torch.version.cuda}), "
        f"CUDA available: {torch.cuda.is_available()}"
    )
    try:
        ensure_loaded()
    except ImportError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    import tensormask_ray._C as ext

    built_with_cuda = bool(getattr(ext, "with_cuda", False))
    print(f"extension: {ext.__file__}")
    print(
        f"built with CUDA kernels: {'yes' if built_with_cuda else 'no (no CUDA toolkit at build time)'}"
    )
    table = kernel_table()
    width = max(len(name) for name in table)
    print(f"{'op':<{width}}  CPU  CUDA")
    for name, keys in table.items():
        print(
            f"{name:<{width}}  {'yes' if keys['CPU'] else 'NO ':<3}  {'yes' if keys['CUDA'] else 'no'}"
        )
    n_cuda = sum(keys["CUDA"] for keys in table.values())
    print(f"CUDA kernels registered: {n_cuda}/{len(table)}")
    if not all(keys["CPU"] for keys in table.values()):
        print("ERROR: some ops have no CPU kernel", file=sys.stderr)
        return 1
    if built_with_cuda and n_cuda != len(table):
        print("ERROR: the build compiled CUDA kernels but not all are registered", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

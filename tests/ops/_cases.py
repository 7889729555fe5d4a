"""Shared inputs for the ops tests: the op cases (fused call, reference call) and random tensors.

Every case is small enough for the references, whose intermediate grows with lam^2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tensormask_ray.ops import library
from tensormask_ray.ops import reference as ref

# The fused ops are tested directly through torch.ops; the extension must be built.
try:
    library.ensure_loaded()
    import tensormask_ray._C as EXT

    LOAD_ERROR = None
except ImportError as e:  # reported by requires_ext
    EXT = None
    LOAD_ERROR = str(e)

# Whether the extension was compiled with its CUDA kernels (a toolkit was found at build time).
BUILT_WITH_CUDA = bool(getattr(EXT, "with_cuda", False))

# Tests of the fused ops need the extension. Where it is missing they skip, except in CI
# (CI=true), where they fail: a broken build must not pass as a run of skips. The check runs in
# the `built_extension` fixture (tests/ops/conftest.py).
IN_CI = os.environ.get("CI", "").strip().lower() == "true"
requires_ext = pytest.mark.usefixtures("built_extension")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OPS = torch.ops.tensormask

# Elements in the reference's (N, Vo, Uo, H, W) intermediate we allow per case.
REFERENCE_BUDGET = 3_000_000


def rand(shape, dtype=torch.float64, seed=0, device="cpu") -> torch.Tensor:
    """Random normal values (never zeros), reproducible per seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


@dataclass(frozen=True)
class Case:
    """One op applied with fixed arguments: `fused(x)` and `reference(x)` compute the same thing."""

    name: str
    shape: tuple[int, int, int, int, int]
    fused: Callable[[torch.Tensor], torch.Tensor]
    reference: Callable[[torch.Tensor], torch.Tensor]

    def __repr__(self) -> str:
        return f"{self.name}{list(self.shape)}"


def swap_hw(lam: int, V: int, U: int, N: int = 2) -> tuple[int, int]:
    """(H, W), not multiples of lam (for lam > 1), as large as the reference budget allows."""
    for H, W in ((2 * lam + 3, 2 * lam + 1), (lam + 3, lam + 1), (9, 7), (5, 7), (3, 2)):
        if N * lam * lam * V * U * H * W <= REFERENCE_BUDGET:
            return H, W
    raise AssertionError("no shape fits")


def swap_case(lam: int, V: int, U: int, pad: float = -6.0, N: int = 2, hw=None) -> Case:
    H, W = hw if hw is not None else swap_hw(lam, V, U, N)
    return Case(
        f"swap_align2nat(lam={lam}, pad={pad})",
        (N, V, U, H, W),
        lambda x: OPS.swap_align2nat(x, lam, pad),
        lambda x: ref.swap_align2nat(x, lam, pad),
    )


def d2_case(lam: int, V: int, U: int, pad: float = -6.0, N: int = 2, hw=None) -> Case:
    """swap_align2nat in Detectron2's geometry. Its reference works at the output size (no lam^2
    intermediate), so (H, W) default to 2*lam + (3, 1): three output rows and columns, the last
    one partial."""
    H, W = hw if hw is not None else (2 * lam + 3, 2 * lam + 1)
    return Case(
        f"swap_align2nat_detectron2(lam={lam}, pad={pad})",
        (N, V, U, H, W),
        lambda x: OPS.swap_align2nat_detectron2(x, lam, pad),
        lambda x: ref.swap_align2nat_detectron2(x, lam, pad),
    )


# Odd and even window grids (lam*V even makes the rows half-pixel), a 1x1 grid, the real 15x15.
D2_WINDOWS = [(3, 3), (4, 4), (5, 2), (2, 1), (1, 1)]
D2_LAMS = [1, 2, 3, 4, 5, 8, 16, 32]
# Output elements per case: the reference's cost grows with them (and with thin inner axes).
D2_BUDGET = 50_000


def d2_forward_cases() -> list[Case]:
    cases = [
        d2_case(lam, V, U)
        for lam in D2_LAMS
        for V, U in D2_WINDOWS
        if 2 * lam * lam * V * U * 9 <= D2_BUDGET  # N = 2, 3 x 3 output positions
    ]
    cases += [d2_case(lam, 15, 15, N=1, hw=(24, 21)) for lam in (1, 2)] + [d2_case(4, 15, 15, N=1)]
    cases += [d2_case(2, 16, 16, N=1), d2_case(3, 5, 3, N=3)]
    # Tiny (H, W): every output element at the rim; one pad value other than the default.
    cases += [
        d2_case(2, 3, 3, hw=(1, 1)),
        d2_case(3, 4, 4, hw=(2, 3)),
        d2_case(1, 2, 2, hw=(1, 2)),
        d2_case(8, 2, 3, hw=(3, 1)),
        d2_case(4, 3, 2, pad=0.75),
    ]
    return cases


def d2_gradient_cases() -> list[Case]:
    cases = [d2_case(lam, V, U) for lam in (1, 2, 3, 8) for V, U in [(3, 3), (4, 4), (5, 2)]]
    return cases + [d2_case(32, 1, 2, N=1), d2_case(2, 3, 3, hw=(1, 2))]


def up_case(V: int, U: int, out: tuple[int, int], mode: str, pad: float = -6.0, hw=(6, 5)) -> Case:
    return Case(
        f"up_align2nat(out={out}, {mode}, pad={pad})",
        (2, V, U, *hw),
        lambda x: OPS.up_align2nat(x, out[0], out[1], mode, pad),
        lambda x: ref.up_align2nat(x, out, mode, pad),
    )


def shift_case(op: str, V: int, U: int, alpha: int, pad: float = -6.0, hw=(7, 6)) -> Case:
    return Case(
        f"{op}(alpha={alpha}, pad={pad})",
        (2, V, U, *hw),
        lambda x: getattr(OPS, op)(x, alpha, pad),
        lambda x: getattr(ref, op)(x, alpha, pad),
    )


WINDOWS = [(3, 3), (5, 5), (11, 11), (15, 15), (5, 3)]
LAMS = [1, 2, 3, 4, 8, 32]


def forward_cases() -> list[Case]:
    cases = [swap_case(lam, V, U) for lam in LAMS for V, U in WINDOWS]
    # lam = 32 with H, W > lam (several output rows), and a pad value other than the default.
    cases.append(swap_case(32, 3, 3, pad=2.5, N=1, hw=(35, 33)))
    cases.append(swap_case(3, 5, 3, pad=0.25))
    for V, U in WINDOWS + [(10, 10)]:
        outs = {(2 * V, 2 * U), (V, U), (V, 2 * U + 1), (max(V - 2, 1), max(U - 1, 1)), (70, 70)}
        if (V, U) == (10, 10):
            outs.add((15, 15))  # lambda = 1.5 (fractional)
        for out in sorted(outs):
            for mode in ("bilinear", "nearest"):
                cases.append(up_case(V, U, out, mode))
    cases.append(up_case(10, 10, (15, 15), "bilinear", pad=1.0))
    for V, U in WINDOWS:
        for alpha in (1, 2):
            cases.append(shift_case("align2nat", V, U, alpha))
            cases.append(shift_case("nat2align", V, U, alpha, pad=0.5))
    return cases + d2_forward_cases()


def gradient_cases() -> list[Case]:
    """A smaller grid for the (slower) gradient comparisons."""
    cases = [swap_case(lam, V, U) for lam in LAMS for V, U in [(3, 3), (5, 3), (15, 15)]]
    for V, U, out in [(10, 10, (15, 15)), (5, 3, (10, 7)), (5, 5, (3, 4)), (3, 3, (70, 70))]:
        for mode in ("bilinear", "nearest"):
            cases.append(up_case(V, U, out, mode))
    for alpha in (1, 2):
        cases.append(shift_case("align2nat", 5, 3, alpha))
        cases.append(shift_case("nat2align", 5, 3, alpha))
    return cases + d2_gradient_cases()


def kernel_results() -> dict[str, torch.Tensor]:
    """Forward and backward outputs of the fused ops on a fixed set of cases, for comparing kernel
    variants across processes (the env switches TENSORMASK_CPU_FMA and TENSORMASK_CPU_KERNEL are
    read once per process)."""
    cases = [
        swap_case(1, 5, 3),
        swap_case(2, 5, 3),
        swap_case(3, 15, 15),
        swap_case(8, 5, 5),
        swap_case(32, 3, 3, N=1, hw=(35, 33)),
        up_case(10, 10, (15, 15), "bilinear"),
        up_case(3, 3, (70, 70), "bilinear"),
        up_case(5, 5, (3, 4), "bilinear"),
        up_case(5, 3, (11, 7), "nearest"),
        up_case(5, 3, (5, 6), "bilinear"),
        shift_case("align2nat", 5, 3, 2),
        shift_case("nat2align", 5, 3, 1),
        d2_case(1, 4, 3),
        d2_case(2, 5, 3),
        d2_case(3, 4, 4),
        d2_case(8, 3, 2, N=1),
        d2_case(2, 3, 3, hw=(2, 1)),
        d2_case(1, 15, 15, N=1, hw=(9, 40)),  # float read in place, rim columns on both sides
        d2_case(16, 2, 3, N=1, hw=(40, 37)),  # window wider than the input: mostly pad columns
    ]
    results = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for i, case in enumerate(cases):
            x = rand(case.shape, dtype, seed=40 + i).requires_grad_(True)
            out = case.fused(x)
            (gx,) = torch.autograd.grad(out, x, rand(out.shape, dtype, seed=80 + i))
            results[f"{case!r} {dtype} fwd"] = out.detach()
            results[f"{case!r} {dtype} bwd"] = gx
    return results


def run_child(code: str, env: dict[str, str], *argv: str) -> str:
    """Runs `python -c code *argv` at the repository root in a fresh process (the kernels read
    their TENSORMASK_CPU_* switches once per process): the environment without this process's
    TENSORMASK_CPU_* variables, plus `env`. Returns its stdout; its stderr goes to pytest."""
    root = Path(__file__).resolve().parents[2]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORMASK_CPU_")}
    child_env.update(env, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        env=child_env,
        cwd=root,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return done.stdout

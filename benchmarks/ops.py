"""Benchmark of the fused TensorMask ops (not a test): `python benchmarks/ops.py [--write [--force]]`.

1. swap_align2nat on the P2 level of an 800x1344 image, (N, V, U, H, W) = (N, 15, 15, 200, 336),
   N = 1 and 2, lam = 1, 2, 4, 8, 16, 32, float32, 2 torch threads (issue 16's grid): the forward
   against a clone() of as many bytes as its output, the backward kernel against a clone() of as
   many bytes as grad_x; all four timed interleaved in one process (results_md.time_interleaved),
   medians, and the ratio of the minimums beside them. Targets: forward <= 2x, backward <= 2.5x
   at every (N, lam). On CPU also against the same copy into a buffer advised as huge pages
   (`clone_huge`), the allocation the kernels make for their outputs: the memory-speed peer.
2. The other ops at the same P2 size and N = 2, likewise: align2nat / nat2align (alpha 1; the
   simple heads), up_align2nat bilinear and nearest (5x5 -> 15x15 and 10x10 -> 15x15 windows; the
   upscale heads at lambda 3 and 1.5), and swap_align2nat_detectron2 at every lam.
3. Peak memory of the fused swap_align2nat forward and backward per lam (N = 2). CPU: the growth
   of the peak resident set size (VmHWM of /proc/self/status, reset before the call) of a fresh
   subprocess across one call, which counts every page the op touches (its output included).
   CUDA: the growth of torch.cuda.max_memory_allocated across one call.
4. Against the pure-PyTorch reference at H x W = 64 x 64: forward and backward times and the
   reference's peak memory. A reference run whose estimated peak exceeds --ref-mem-gb is skipped
   (its (N, lam*V, lam*U, H, W) intermediates grow with lam^2: lam = 32 would need about 30 GB).

Prints markdown tables; with --write, replaces this device's block of the "## Ops" section of
benchmarks/RESULTS.md, which it refuses to do when the 1-minute load average at start exceeds 1.0
unless --force is given (the block then says it was measured under load).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_md import BenchmarkRun, add_write_args, time_interleaved  # noqa: E402

from tensormask_ray.ops import library  # noqa: E402
from tensormask_ray.ops import reference as ref  # noqa: E402

V = U = 15
P2_HW = (200, 336)  # P2 of an 800 x 1344 image
REF_SHAPE = (2, 15, 15, 64, 64)
PEAK_N = 2
# Issue 16's targets: the op's time against a clone of as many bytes (its output / grad_x).
FWD_TARGET, BWD_TARGET = 2.0, 2.5
# Peak bytes of the reference forward / forward+backward, as multiples of its (N, lam*V, lam*U, H, W)
# intermediate (measured on CPU at lam = 2 and 4: 4.1x and 8.3x; the resized tensor, two gathers
# and the where, then autograd's buffers).
REF_PEAK_FACTOR = {"fwd": 4.2, "fwd+bwd": 8.5}


def p2_shape(n: int) -> tuple[int, int, int, int, int]:
    return (n, V, U, *P2_HW)


def nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def ref_estimate(shape, lam: int, dtype, what: str) -> float:
    N, V_, U_, H, W = shape
    return REF_PEAK_FACTOR[what] * nbytes((N, lam * V_, lam * U_, H, W), dtype)


MADV_HUGEPAGE = 14  # Linux
HUGE_PAGE = 2 << 20


def clone_huge(src: torch.Tensor) -> torch.Tensor:
    """src.clone() into a fresh buffer whose 2 MiB-aligned interior is advised MADV_HUGEPAGE
    before it is written: the allocation the fused CPU kernels make for their outputs
    (csrc/cpu/cpu_kernels.h, empty_output), so the peer that isolates memory speed from page
    faults and TLB misses."""
    dst = torch.empty_like(src)
    begin = dst.data_ptr()
    lo = -(-begin // HUGE_PAGE) * HUGE_PAGE
    hi = (begin + dst.numel() * dst.element_size()) // HUGE_PAGE * HUGE_PAGE
    if hi > lo:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_HUGEPAGE)
    return dst.copy_(src)


def _sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else None


# ---- peak memory ---------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int:
    """Resets the peak RSS (VmHWM) to the current RSS, which it returns. (getrusage's ru_maxrss
    cannot be used: Linux carries the parent's high-water mark over fork and exec.)"""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then VmHWM holds the peak since this (fresh) process started
    return _status_bytes("VmRSS")


def peak_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: the peak-RSS growth of one forward and then one backward call."""
    library.ensure_loaded()
    dtype = getattr(torch, args.dtype)
    shape = tuple(args.shape)
    lam = args.lam
    ops = torch.ops.tensormask
    # Warm up on a tiny input (loads the kernels, starts the thread pool), then allocate the input.
    tiny = torch.randn(1, 3, 3, 8, 8, dtype=dtype, requires_grad=args.impl == "reference")
    if args.impl == "fused":
        ops.swap_align2nat_backward(ops.swap_align2nat(tiny, 2, -6.0), list(tiny.shape), 2)
    else:
        ref.swap_align2nat(tiny, 2, -6.0).sum().backward()
    x = torch.randn(shape, dtype=dtype, requires_grad=args.impl == "reference")
    base = _reset_peak_rss()
    if args.impl == "fused":
        out = ops.swap_align2nat(x, lam, -6.0)
    else:
        out = ref.swap_align2nat(x, lam, -6.0)
    fwd = _status_bytes("VmHWM") - base
    base = _reset_peak_rss()
    if args.impl == "fused":
        grad = ops.swap_align2nat_backward(out, list(shape), lam)
    else:
        out.backward(torch.ones_like(out))
        grad = x.grad
    bwd = _status_bytes("VmHWM") - base
    assert grad.shape == shape
    print(json.dumps({"fwd": fwd, "bwd": bwd, "out_bytes": out.numel() * out.element_size()}))


def peak_cpu(impl: str, shape, lam: int, dtype) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_peak-child", impl]
    cmd += ["--lam", str(lam), "--dtype", str(dtype).replace("torch.", "")]
    cmd += ["--shape", *map(str, shape)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_cuda(impl: str, shape, lam: int, dtype) -> dict:
    ops = torch.ops.tensormask
    x = torch.randn(shape, dtype=dtype, device="cuda", requires_grad=impl == "reference")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = ops.swap_align2nat(x, lam, -6.0) if impl == "fused" else ref.swap_align2nat(x, lam, -6.0)
    torch.cuda.synchronize()
    fwd = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if impl == "fused":
        ops.swap_align2nat_backward(out, list(shape), lam)
    else:
        out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    bwd = torch.cuda.max_memory_allocated() - base
    result = {"fwd": fwd, "bwd": bwd, "out_bytes": out.numel() * out.element_size()}
    del x, out
    torch.cuda.empty_cache()
    return result


# ---- 1 and 2: ops against clone() ------------------------------------------------------------


class OpCase:
    """One op at one input shape: forward(x) and backward(grad) callables."""

    def __init__(self, name: str, shape, forward, backward) -> None:
        self.name, self.shape, self.forward, self.backward = name, tuple(shape), forward, backward


def swap_case(n: int, lam: int, geometry: str = "paper") -> OpCase:
    ops = torch.ops.tensormask
    shape = p2_shape(n)
    if geometry == "paper":
        fwd, bwd = ops.swap_align2nat, ops.swap_align2nat_backward
        name = f"swap_align2nat lam {lam}"
    else:
        fwd, bwd = ops.swap_align2nat_detectron2, ops.swap_align2nat_detectron2_backward
        name = f"swap_align2nat_detectron2 lam {lam}"
    return OpCase(name, shape, lambda x: fwd(x, lam, -6.0), lambda g: bwd(g, list(shape), lam))


def other_cases(n: int, lams: list[int]) -> list[OpCase]:
    ops = torch.ops.tensormask
    shape = p2_shape(n)
    cases = [
        OpCase("align2nat alpha 1", shape, lambda x: ops.align2nat(x, 1, -6.0),
               lambda g: ops.align2nat_backward(g, 1)),
        OpCase("nat2align alpha 1", shape, lambda x: ops.nat2align(x, 1, -6.0),
               lambda g: ops.nat2align_backward(g, 1)),
    ]  # fmt: skip
    for v_in in (5, 10):
        small = (n, v_in, v_in, *P2_HW)
        for mode in ("bilinear", "nearest") if v_in == 5 else ("bilinear",):
            cases.append(
                OpCase(
                    f"up_align2nat {mode} {v_in}x{v_in} -> {V}x{U}",
                    small,
                    lambda x, mode=mode: ops.up_align2nat(x, V, U, mode, -6.0),
                    lambda g, small=small, mode=mode: ops.up_align2nat_backward(
                        g, list(small), mode
                    ),
                )
            )
    cases += [swap_case(n, lam, "detectron2") for lam in lams]
    return cases


def bench_against_clone(case: OpCase, args, dtype) -> dict:
    """Forward vs a clone of the output's bytes, backward vs a clone of grad_x's bytes."""
    device = args.device
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(case.shape, generator=g, dtype=dtype, device=device)
    out = case.forward(x)
    grad = torch.randn(out.shape, generator=g, dtype=dtype, device=device)
    like_out = torch.randn(out.numel(), generator=g, dtype=dtype, device=device)
    like_in = torch.randn(x.numel(), generator=g, dtype=dtype, device=device)
    timed = {
        "fwd": lambda: case.forward(x),
        "clone_out": like_out.clone,
        "bwd": lambda: case.backward(grad),
        "clone_in": like_in.clone,
    }
    if device == "cpu":
        timed["huge_out"] = lambda: clone_huge(like_out)
        timed["huge_in"] = lambda: clone_huge(like_in)
    t = time_interleaved(timed, args.repeats, args.warmup, _sync(device))
    row = {"name": case.name, "in_shape": case.shape, "out_shape": tuple(out.shape), **t}
    row["fwd_ratio"] = t["fwd"].median / t["clone_out"].median
    row["fwd_ratio_min"] = t["fwd"].min / t["clone_out"].min
    row["bwd_ratio"] = t["bwd"].median / t["clone_in"].median
    row["bwd_ratio_min"] = t["bwd"].min / t["clone_in"].min
    if device == "cpu":
        row["fwd_ratio_huge"] = t["fwd"].median / t["huge_out"].median
        row["bwd_ratio_huge"] = t["bwd"].median / t["huge_in"].median
    print(
        f"  {case.name} {case.shape}: fwd {fmt_ms(t['fwd'].median)} ms ({row['fwd_ratio']:.2f}x clone), "
        f"bwd {fmt_ms(t['bwd'].median)} ms ({row['bwd_ratio']:.2f}x clone)",
        flush=True,
    )
    return row


# ---- 4: fused vs reference -------------------------------------------------------------------


def bench_reference(args, dtype, lams) -> list[dict]:
    ops = torch.ops.tensormask
    device = args.device
    sync = _sync(device)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(REF_SHAPE, generator=g, dtype=dtype, device=device)
    budget = args.ref_mem_gb * 2**30
    rows = []
    for lam in lams:
        row = {"lam": lam}
        out = ops.swap_align2nat(x, lam, -6.0)
        grad = torch.randn(out.shape, generator=g, dtype=dtype, device=device)
        xr = x.detach().clone().requires_grad_(True)
        fused = time_interleaved(
            {
                "fwd": lambda lam=lam: ops.swap_align2nat(x, lam, -6.0),
                "bwd": lambda lam=lam, grad=grad: ops.swap_align2nat_backward(
                    grad, list(REF_SHAPE), lam
                ),
            },
            args.repeats,
            args.warmup,
            sync,
        )
        row["fused_fwd"], row["fused_bwd"] = fused["fwd"].median, fused["bwd"].median
        if ref_estimate(REF_SHAPE, lam, dtype, "fwd") > budget:
            row["skipped"] = ref_estimate(REF_SHAPE, lam, dtype, "fwd")
        else:
            row["ref_fwd"] = time_interleaved(
                {"fwd": lambda lam=lam: ref.swap_align2nat(x, lam, -6.0)},
                args.ref_repeats,
                1,
                sync,
            )["fwd"].median
            if ref_estimate(REF_SHAPE, lam, dtype, "fwd+bwd") <= budget:

                def ref_backward(lam=lam, grad=grad, xr=xr):
                    y = ref.swap_align2nat(xr, lam, -6.0)
                    if sync is not None:
                        sync()
                    t0 = time.perf_counter()
                    y.backward(grad)
                    if sync is not None:
                        sync()
                    xr.grad = None
                    return time.perf_counter() - t0

                ref_backward()
                row["ref_bwd"] = statistics.median(ref_backward() for _ in range(args.ref_repeats))
                peak_fn = peak_cuda if device == "cuda" else peak_cpu
                row["ref_peak"] = peak_fn("reference", REF_SHAPE, lam, dtype)
        rows.append(row)
        print(f"  64x64 lam={lam}: {row}", flush=True)
        del out, grad, xr
    return rows


# ---- report ----------------------------------------------------------------------------------


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def fmt_mb(b: float) -> str:
    return f"{b / 2**20:.0f}"


def clone_table(rows: list[dict], first_col: str, first) -> list[str]:
    huge = "huge_out" in rows[0]
    head = (
        f"| {first_col} | input | output | fwd ms | clone(out) ms | fwd / clone | (min) "
        "| bwd ms | clone(grad_x) ms | bwd / clone | (min) |"
    )
    rule = "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if huge:
        head += " huge clone(out) ms | fwd / huge | huge clone(grad_x) ms | bwd / huge |"
        rule += "---:|---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (
            f"| {first(r)} | {r['in_shape']} | {r['out_shape']} | {fmt_ms(r['fwd'].median)} | "
            f"{fmt_ms(r['clone_out'].median)} | {r['fwd_ratio']:.2f} | {r['fwd_ratio_min']:.2f} | "
            f"{fmt_ms(r['bwd'].median)} | {fmt_ms(r['clone_in'].median)} | {r['bwd_ratio']:.2f} | "
            f"{r['bwd_ratio_min']:.2f} |"
        )
        if huge:
            line += (
                f" {fmt_ms(r['huge_out'].median)} | {r['fwd_ratio_huge']:.2f} | "
                f"{fmt_ms(r['huge_in'].median)} | {r['bwd_ratio_huge']:.2f} |"
            )
        lines.append(line)
    return lines


def report(args, dtype, grid, others, peaks, ref_rows) -> str:
    dev = args.device
    dt = str(dtype).replace("torch.", "")
    lines = [
        f"#### swap_align2nat on P2: (N, V, U, H, W) = (N, {V}, {U}, {P2_HW[0]}, {P2_HW[1]}), "
        f"{dt}, {dev}",
        "",
        f"Median of {args.repeats} interleaved repeats (after {args.warmup} warm-up) of the op and "
        "its peer: `clone(out)` copies as many bytes as the output, `clone(grad_x)` as many as "
        "the input; `(min)`: the ratio of the fastest runs, less sensitive to other load."
        + (
            " `huge clone`: the same copy into a fresh buffer advised as huge pages (MADV_HUGEPAGE)"
            ", as the CPU kernels allocate their outputs and grad_x: torch's `clone()` writes 4 KiB"
            " pages, and its page faults and TLB misses are part of its time; the huge clone is"
            " this machine's memory speed."
            if dev == "cpu"
            else ""
        ),
        "",
        *clone_table(grid, "N, lam", lambda r: f"{r['n']}, {r['lam']}"),
    ]
    if others:
        lines += [
            "",
            f"#### The other ops at P2 size, N = {args.other_n}, {dt}, {dev}",
            "",
            *clone_table(others, "op", lambda r: r["name"]),
            "",
            "up_align2nat's grad is (Vo/V)^2 times the size of its grad_x (9x from 5x5, 2.25x "
            "from 10x10): its backward reads that many times more bytes than it writes, so its "
            "ratio to a clone of grad_x is not a distance from memory speed as the others are.",
        ]
    mem_what = (
        "torch.cuda.max_memory_allocated growth"
        if dev == "cuda"
        else "peak-RSS (VmHWM) growth of a fresh subprocess"
    )
    if peaks:
        lines += [
            "",
            f"#### Peak memory of swap_align2nat, N = {PEAK_N}",
            "",
            f"Peak = {mem_what} across one call (the output / grad_x included).",
            "",
            "| lam | fwd peak MB | bwd peak MB | fwd peak / output bytes |",
            "|---:|---:|---:|---:|",
        ]
        for lam, p in peaks.items():
            lines.append(
                f"| {lam} | {fmt_mb(p['fwd'])} | {fmt_mb(p['bwd'])} | {p['fwd'] / p['out_bytes']:.2f} |"
            )
    if ref_rows:
        lines += [
            "",
            f"#### Fused vs reference: (N, V, U, H, W) = {REF_SHAPE}",
            "",
            "| lam | fused fwd ms | reference fwd ms | speed-up | fused bwd ms | reference bwd ms "
            "| speed-up | reference fwd+bwd peak MB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ref_rows:
            if "skipped" in r:
                note = f"skipped: needs ~{r['skipped'] / 2**30:.0f} GB > --ref-mem-gb {args.ref_mem_gb:g}"
                lines.append(
                    f"| {r['lam']} | {fmt_ms(r['fused_fwd'])} | {note} | | {fmt_ms(r['fused_bwd'])} | | | |"
                )
                continue
            bwd = fmt_ms(r["ref_bwd"]) if "ref_bwd" in r else "skipped (memory)"
            bwd_x = f"{r['ref_bwd'] / r['fused_bwd']:.0f}x" if "ref_bwd" in r else ""
            peak = r.get("ref_peak")
            peak_s = fmt_mb(peak["fwd"] + peak["bwd"]) if peak else ""
            lines.append(
                f"| {r['lam']} | {fmt_ms(r['fused_fwd'])} | {fmt_ms(r['ref_fwd'])} | "
                f"{r['ref_fwd'] / r['fused_fwd']:.0f}x | {fmt_ms(r['fused_bwd'])} | {bwd} | {bwd_x} | "
                f"{peak_s} |"
            )
    lines += ["", "Targets:", "", *targets(grid, peaks, ref_rows)]
    return "\n".join(lines)


def targets(grid, peaks, ref_rows) -> list[str]:
    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**NOT met**"

    out = []
    for what, key, target in (("forward", "fwd", FWD_TARGET), ("backward", "bwd", BWD_TARGET)):
        worst = max(grid, key=lambda r: r[f"{key}_ratio"])
        worst_min = max(r[f"{key}_ratio_min"] for r in grid)
        out.append(
            f"- swap_align2nat {what} <= {target:g}x a clone of "
            f"{'its output' if key == 'fwd' else 'grad_x'} at every (N, lam): "
            f"{verdict(worst[f'{key}_ratio'] <= target)} (worst median ratio "
            f"{worst[f'{key}_ratio']:.2f}x at N {worst['n']}, lam {worst['lam']}; worst ratio of "
            f"minimums {worst_min:.2f}x)"
        )
        if f"{key}_ratio_huge" in grid[0]:
            huge = [r[f"{key}_ratio_huge"] for r in grid]
            out.append(
                f"  - against the huge-page clone (memory speed): "
                f"{verdict(max(huge) <= target)} ({min(huge):.2f}-{max(huge):.2f}x)"
            )
    measured = [r for r in ref_rows if r["lam"] >= 8 and "ref_fwd" in r]
    if measured:
        ok = all(r["ref_fwd"] / r["fused_fwd"] >= 10 for r in measured)
        speedups = ", ".join(
            f"lam {r['lam']}: {r['ref_fwd'] / r['fused_fwd']:.0f}x" for r in measured
        )
        skipped = [r["lam"] for r in ref_rows if r["lam"] >= 8 and "ref_fwd" not in r]
        out.append(
            f"- fused forward >= 10x faster than the reference at lam >= 8: {verdict(ok)} where "
            f"measured ({speedups})"
            + (f"; lam {skipped} not measured (reference out of memory budget)" if skipped else "")
        )
    if peaks:
        ratios = [p["fwd"] / p["out_bytes"] for p in peaks.values()]
        fwd = [p["fwd"] for p in peaks.values()]
        ok = max(ratios) <= 1.1 and max(fwd) / max(min(fwd), 1) <= 1.25
        out.append(
            f"- fused peak memory independent of lam: {verdict(ok)} (forward peak "
            f"{min(fwd) / 2**20:.0f}-{max(fwd) / 2**20:.0f} MB = {min(ratios):.2f}-{max(ratios):.2f}x "
            "its output, which is N*V*U*lam^2*ceil(H/lam)*ceil(W/lam) elements: nothing else is "
            "allocated)"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"]
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--ns", default="1,2", help="batch sizes N of the swap_align2nat grid")
    parser.add_argument("--lams", default="1,2,4,8,16,32")
    parser.add_argument("--other-n", type=int, default=2, help="N of the other ops (0: skip them)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--ref-repeats", type=int, default=3)
    parser.add_argument(
        "--ref-mem-gb", type=float, default=4.0, help="skip larger reference runs (0: skip all)"
    )
    add_write_args(parser, "Ops")
    parser.add_argument("--_peak-child", dest="peak_child", choices=["fused", "reference"])
    parser.add_argument("--lam", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=int, nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        args.impl = args.peak_child
        peak_child(args)
        return
    run = BenchmarkRun.start(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    library.ensure_loaded()
    dtype = getattr(torch, args.dtype)
    lams = [int(s) for s in args.lams.split(",")]
    ns = [int(s) for s in args.ns.split(",")]

    print(f"1. swap_align2nat, P2, {args.device}, {args.dtype}", flush=True)
    grid = []
    for n in ns:
        for lam in lams:
            grid.append({"n": n, "lam": lam, **bench_against_clone(swap_case(n, lam), args, dtype)})
    others = []
    if args.other_n > 0:
        print(f"2. the other ops, N = {args.other_n}", flush=True)
        others = [bench_against_clone(c, args, dtype) for c in other_cases(args.other_n, lams)]
    peaks = {}
    if not args.no_peak:
        print("3. peak memory", flush=True)
        peak_fn = peak_cuda if args.device == "cuda" else peak_cpu
        peaks = {lam: peak_fn("fused", p2_shape(PEAK_N), lam, dtype) for lam in lams}
    ref_rows = []
    if args.ref_mem_gb > 0:
        print(f"4. reference comparison {REF_SHAPE}", flush=True)
        ref_rows = bench_reference(args, dtype, lams)

    threads = torch.get_num_threads() if args.device == "cpu" else None
    header = run.header(threads=threads, device=args.device)
    text = "\n".join(header) + "\n\n" + report(args, dtype, grid, others, peaks, ref_rows)
    print()
    print(text)
    if args.write:
        device = args.device.upper()
        run.write("Ops", f"### {device}\n\n{text}", block=f"ops:{args.device}")


if __name__ == "__main__":
    main()

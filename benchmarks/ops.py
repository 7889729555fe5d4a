"""Benchmark of the fused TensorMask ops (not a test): `python benchmarks/ops.py [--write]`.

1. The P2 level of an 800x1344 image (N=2, V=U=15, H x W = 200 x 336), lam = 1..32: median time of
   the fused swap_align2nat forward, its backward kernel, and a clone() of as many bytes as the
   output, measured interleaved in one process (torch.set_num_threads left at its default).
2. Peak memory of the fused forward and backward per lam. CPU: the growth of the peak resident set
   size (VmHWM of /proc/self/status, reset before the call) of a fresh subprocess across one call,
   which counts every page the op touches (its output included). CUDA: the growth of
   torch.cuda.max_memory_allocated across one call.
3. Against the pure-PyTorch reference at H x W = 64 x 64: forward and backward times and the
   reference's peak memory. A reference run whose estimated peak exceeds --ref-mem-gb is skipped
   (its (N, lam*V, lam*U, H, W) intermediates grow with lam^2: lam = 32 would need about 30 GB).

Prints markdown tables; with --write, replaces the "## Ops" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tensormask_ray.ops import library  # noqa: E402
from tensormask_ray.ops import reference as ref  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
P2_SHAPE = (2, 15, 15, 200, 336)  # (N, V, U, H, W): P2 of an 800 x 1344 image, 15 x 15 windows
REF_SHAPE = (2, 15, 15, 64, 64)
# Peak bytes of the reference forward / forward+backward, as multiples of its (N, lam*V, lam*U, H, W)
# intermediate (measured on CPU at lam = 2 and 4: 4.1x and 8.3x; the resized tensor, two gathers
# and the where, then autograd's buffers).
REF_PEAK_FACTOR = {"fwd": 4.2, "fwd+bwd": 8.5}


# ---- timing --------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def time_interleaved(fns: dict, device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of each fn (and, as "<name>_min", the minimum), the fns run in turn each
    repeat so that load changes hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            _time_once(fn, device)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, device))
    result = {name: statistics.median(s) for name, s in samples.items()}
    result.update({f"{name}_min": min(s) for name, s in samples.items()})
    return result


def swap_shape(shape, lam: int) -> tuple[int, ...]:
    N, V, U, H, W = shape
    return (N, lam * V, lam * U, -(-H // lam), -(-W // lam))


def nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def ref_estimate(shape, lam: int, dtype, what: str) -> float:
    N, V, U, H, W = shape
    return REF_PEAK_FACTOR[what] * nbytes((N, lam * V, lam * U, H, W), dtype)


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


# ---- the three parts -----------------------------------------------------------------------


def bench_p2(args, dtype, lams) -> list[dict]:
    ops = torch.ops.tensormask
    device = args.device
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(P2_SHAPE, generator=g, dtype=dtype, device=device)
    rows = []
    for lam in lams:
        out = ops.swap_align2nat(x, lam, -6.0)
        grad = torch.randn(out.shape, generator=g, dtype=dtype, device=device)
        same_bytes = torch.randn(out.numel(), generator=g, dtype=dtype, device=device)
        times = time_interleaved(
            {
                "fwd": lambda lam=lam: ops.swap_align2nat(x, lam, -6.0),
                "bwd": lambda lam=lam, grad=grad: ops.swap_align2nat_backward(
                    grad, list(P2_SHAPE), lam
                ),
                "clone": lambda t=same_bytes: t.clone(),
            },
            device,
            args.warmup,
            args.repeats,
        )
        peak = (peak_cuda if device == "cuda" else peak_cpu)("fused", P2_SHAPE, lam, dtype)
        rows.append({"lam": lam, "out_shape": tuple(out.shape), **times, "peak": peak})
        print(f"  P2 lam={lam}: {fmt_ms(times['fwd'])} / {fmt_ms(times['bwd'])} ms", flush=True)
        del out, grad, same_bytes
    return rows


def bench_reference(args, dtype, lams) -> list[dict]:
    ops = torch.ops.tensormask
    device = args.device
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
            device,
            args.warmup,
            args.repeats,
        )
        row["fused_fwd"], row["fused_bwd"] = fused["fwd"], fused["bwd"]
        if ref_estimate(REF_SHAPE, lam, dtype, "fwd") > budget:
            row["skipped"] = ref_estimate(REF_SHAPE, lam, dtype, "fwd")
        else:
            row["ref_fwd"] = time_interleaved(
                {"fwd": lambda lam=lam: ref.swap_align2nat(x, lam, -6.0)},
                device,
                1,
                args.ref_repeats,
            )["fwd"]
            if ref_estimate(REF_SHAPE, lam, dtype, "fwd+bwd") <= budget:

                def ref_backward(lam=lam, grad=grad, xr=xr):
                    y = ref.swap_align2nat(xr, lam, -6.0)
                    _sync(device)
                    t0 = time.perf_counter()
                    y.backward(grad)
                    _sync(device)
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


# ---- report --------------------------------------------------------------------------------


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def fmt_mb(b: float) -> str:
    return f"{b / 2**20:.0f}"


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {os.cpu_count()} cores, torch.get_num_threads() = {torch.get_num_threads()}"


def report(args, dtype, p2_rows, ref_rows) -> tuple[str, list[str]]:
    dev = args.device
    mem_what = (
        "torch.cuda.max_memory_allocated growth"
        if dev == "cuda"
        else "peak-RSS (VmHWM) growth of a fresh subprocess"
    )
    lines = [
        f"#### swap_align2nat on P2: N, V, U, H, W = {P2_SHAPE}, {str(dtype).replace('torch.', '')}, {dev}",
        "",
        f"Median of {args.repeats} interleaved repeats (after {args.warmup} warm-up); `clone` "
        "copies as many bytes as the output; `(min)`: the ratio of the fastest runs, less "
        f"sensitive to other load on the machine; peak = {mem_what} across one call (the "
        "output / grad_x included).",
        "",
        "| lam | output (N, Vo, Uo, Ho, Wo) | fwd ms | bwd ms | clone ms | fwd / clone "
        "| (min) | bwd / clone | (min) | fwd peak MB | bwd peak MB | fwd peak / output bytes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in p2_rows:
        p = r["peak"]
        lines.append(
            f"| {r['lam']} | {r['out_shape']} | {fmt_ms(r['fwd'])} | {fmt_ms(r['bwd'])} | "
            f"{fmt_ms(r['clone'])} | {r['fwd'] / r['clone']:.2f} | "
            f"{r['fwd_min'] / r['clone_min']:.2f} | {r['bwd'] / r['clone']:.2f} | "
            f"{r['bwd_min'] / r['clone_min']:.2f} | "
            f"{fmt_mb(p['fwd'])} | {fmt_mb(p['bwd'])} | {p['fwd'] / p['out_bytes']:.2f} |"
        )
    lines += [
        "",
        f"#### Fused vs reference: N, V, U, H, W = {REF_SHAPE}",
        "",
        "| lam | fused fwd ms | reference fwd ms | speed-up | fused bwd ms | reference bwd ms "
        "| speed-up | reference fwd+bwd peak MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ref_rows:
        if "skipped" in r:
            note = (
                f"skipped: needs ~{r['skipped'] / 2**30:.0f} GB > --ref-mem-gb {args.ref_mem_gb:g}"
            )
            lines.append(
                f"| {r['lam']} | {fmt_ms(r['fused_fwd'])} | {note} | | {fmt_ms(r['fused_bwd'])} | | | |"
            )
            continue
        bwd = f"{fmt_ms(r['ref_bwd'])}" if "ref_bwd" in r else "skipped (memory)"
        bwd_x = f"{r['ref_bwd'] / r['fused_bwd']:.0f}x" if "ref_bwd" in r else ""
        peak = r.get("ref_peak")
        peak_s = fmt_mb(peak["fwd"] + peak["bwd"]) if peak else ""
        lines.append(
            f"| {r['lam']} | {fmt_ms(r['fused_fwd'])} | {fmt_ms(r['ref_fwd'])} | "
            f"{r['ref_fwd'] / r['fused_fwd']:.0f}x | {fmt_ms(r['fused_bwd'])} | {bwd} | {bwd_x} | "
            f"{peak_s} |"
        )

    # Targets.
    worst = max(p2_rows, key=lambda r: r["fwd"] / r["clone"])
    t1 = worst["fwd"] / worst["clone"] <= 3.0
    measured = [r for r in ref_rows if r["lam"] >= 8 and "ref_fwd" in r]
    t2 = bool(measured) and all(r["ref_fwd"] / r["fused_fwd"] >= 10 for r in measured)
    skipped = [r["lam"] for r in ref_rows if r["lam"] >= 8 and "ref_fwd" not in r]
    ratios = [r["peak"]["fwd"] / r["peak"]["out_bytes"] for r in p2_rows]
    peaks = [r["peak"]["fwd"] for r in p2_rows]
    t3 = max(ratios) <= 1.1 and max(peaks) / max(min(peaks), 1) <= 1.25
    speedups = ", ".join(f"lam {r['lam']}: {r['ref_fwd'] / r['fused_fwd']:.0f}x" for r in measured)
    targets = [
        f"- fused forward <= 3x clone at every lam: **{'met' if t1 else 'NOT met'}** "
        f"(worst median ratio {worst['fwd'] / worst['clone']:.2f}x at lam {worst['lam']}; "
        f"worst ratio of minimums {max(r['fwd_min'] / r['clone_min'] for r in p2_rows):.2f}x)",
        f"- fused forward >= 10x faster than the reference at lam >= 8: "
        f"**{'met' if t2 else 'NOT met'}** where measured ({speedups or 'none'})"
        + (f"; lam {skipped} not measured (reference out of memory budget)" if skipped else ""),
        f"- fused peak memory independent of lam: **{'met' if t3 else 'NOT met'}** (forward peak "
        f"{min(peaks) / 2**20:.0f}-{max(peaks) / 2**20:.0f} MB = {min(ratios):.2f}-{max(ratios):.2f}x "
        "its output, which is N*V*U*lam^2*ceil(H/lam)*ceil(W/lam) elements: nothing else is allocated)",
    ]
    return "\n".join(lines), targets


def write_section(text: str, device: str) -> None:
    """Replaces this device's block of the "## Ops" section of RESULTS.md (other blocks, other
    sections stay)."""
    begin, end = f"<!-- ops:{device} -->", f"<!-- /ops:{device} -->"
    block = f"{begin}\n### {device.upper()}\n\n{text.rstrip()}\n{end}\n"
    intro = (
        "## Ops\n\nFused TensorMask ops (csrc/) vs clone() and the pure-PyTorch references; "
        "produced by `benchmarks/ops.py --write` (one block per device).\n\n"
    )
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == "## Ops"), None)
    if start is None:
        RESULTS.write_text(old.rstrip() + "\n\n" + intro + block)
        return
    stop = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = "".join(lines[start:stop])
    if begin in section and end in section:
        head, _, tail = section.partition(begin)
        section = head + block.rstrip("\n") + tail.partition(end)[2]
    else:
        section = section.rstrip() + "\n\n" + block
    if not section.endswith("\n\n") and stop < len(lines):
        section = section.rstrip("\n") + "\n\n"
    RESULTS.write_text("".join(lines[:start]) + section + "".join(lines[stop:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"]
    )
    parser.add_argument("--lams", default="1,2,4,8,16,32")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ref-repeats", type=int, default=3)
    parser.add_argument("--ref-mem-gb", type=float, default=4.0, help="skip larger reference runs")
    parser.add_argument("--write", action="store_true", help="update the Ops section of RESULTS.md")
    parser.add_argument("--_peak-child", dest="peak_child", choices=["fused", "reference"])
    parser.add_argument("--lam", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=int, nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        args.impl = args.peak_child
        peak_child(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    library.ensure_loaded()
    dtype = getattr(torch, args.dtype)
    lams = [int(s) for s in args.lams.split(",")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.time()
    print(f"P2 {P2_SHAPE}, {args.device}, {args.dtype}", flush=True)
    p2_rows = bench_p2(args, dtype, lams)
    print(f"reference comparison {REF_SHAPE}", flush=True)
    ref_rows = bench_reference(args, dtype, lams)
    tables, targets = report(args, dtype, p2_rows, ref_rows)
    command = shlex.join(
        [os.path.relpath(sys.executable, ROOT), "benchmarks/ops.py", *sys.argv[1:]]
    )
    header = [
        f"Command: `{command}` ({time.time() - started:.0f} s)",
        f"Machine: {machine(args.device)}; load average at start {load:.2f}",
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
    ]
    text = (
        "\n".join(["- " + h for h in header])
        + "\n\n"
        + tables
        + "\n\nTargets:\n\n"
        + "\n".join(targets)
    )
    print()
    print(text)
    if args.write:
        write_section(text, args.device)
        print(f"\nwrote the Ops section of {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

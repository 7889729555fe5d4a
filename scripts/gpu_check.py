#!/usr/bin/env python3
"""Everything a GPU can tell us about tensormask-ray, in one command of at most 8 minutes:

    python scripts/gpu_check.py OUT_DIR        (make gpu-check OUT=OUT_DIR)

It needs only torch, torchvision, numpy, Pillow, PyYAML and pytest: no Ray, MLflow, pycocotools,
imgviz or internet, and no `make install` (it builds the extension in place against the torch it
runs with). In order:

 1. environment  torch/CUDA/GPU, the modules present
 2. build        `setup.py build_ext --inplace` for this GPU's architecture only; what was compiled
                 and which kernels registered (`python -m tensormask_ray.ops.build_info`)
 3. CUDA op tests `pytest tests/ops -m gpu`: CUDA == CPU == reference in every dtype,
                 deterministic backward, opcheck and torch.compile, the sparse decoder on CUDA
 4. model        the paper's model (R-50-FPN bipyramid, 800x1216, batch 2) forward+backward on CUDA
                 in float32 (losses equal to the CPU's) and bf16 autocast (finite); peak memory
 5. training     the demo's model on synthetic shapes for 300 iterations in one process, through
                 the same per-worker loop Ray Train runs (`run_training_loop` + `LocalContext`);
                 the loss must fall
 6. timings      swap_align2nat at every lam vs a device-to-device copy of the same bytes; TensorMask
                 vs torchvision's Mask R-CNN (R-50-FPN, 800 px) inference and training step, fp32
                 and bf16; Detectron2's SwapAlign2Nat kernel vs ours where Detectron2's TensorMask
                 extension is importable (`from tensormask import _C`), else "not available"
 7. CPU op tests `pytest tests/ops -m "not gpu"` under this torch, if time is left

and writes OUT_DIR/gpu-check.md (a "## GPU" section for benchmarks/RESULTS.md: the command, the
machine, every check and the figures) and OUT_DIR/gpu-check.json. Exit status 1 if any check
failed. Without a GPU nothing is built, the CUDA parts are reported as skipped, and the torch-only
parts (model, training loop, timings) run on the CPU at small sizes, in well under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BUDGET_S = 480.0  # the whole check, on one GPU
REQUIRED_MODULES = ("torch", "torchvision", "numpy", "PIL", "yaml", "pytest")
PAD = -6.0


class CheckFailed(Exception):
    """A check ran and found something wrong (the message says what)."""


@dataclass(frozen=True)
class Sizes:
    """What the checks run at: the paper's sizes on a GPU, small ones on a CPU."""

    image: tuple[int, int]  # (H, W), multiples of 32
    model_overrides: dict[str, Any]  # on the table2c-bipyramid preset (R-50-FPN bipyramid, V = 15)
    train_iters: int
    train_overrides: dict[str, Any]  # on the demo's training config
    timing_image: tuple[int, int]  # TensorMask vs Mask R-CNN
    detections: int  # per image, both models (the paper's 100 on a GPU)
    maskrcnn_options: dict[str, Any]  # on torchvision's maskrcnn_resnet50_fpn
    window_shape: tuple[int, int, int, int, int]  # (N, V, U, H, W) of a swap_align2nat input
    lams: tuple[int, ...]
    warmup: int
    repeats: int


GPU_SIZES = Sizes(
    image=(800, 1216),
    model_overrides={},
    train_iters=300,
    train_overrides={},
    timing_image=(800, 1216),
    detections=100,
    maskrcnn_options={},
    window_shape=(2, 15, 15, 200, 336),  # P2 of an 800 x 1344 image, 15 x 15 windows
    lams=(1, 2, 4, 8, 16, 32),
    warmup=2,
    repeats=5,
)
_TINY = {
    "model.backbone.depth": 18,
    "model.fpn_channels": 32,
    "model.cls_channels": 32,
    "model.box_channels": 32,
    "model.mask_channels": 32,
    "model.tower_depth": 1,
    "model.max_level": 5,
}
CPU_SIZES = Sizes(
    image=(64, 96),
    model_overrides={**_TINY, "model.window_sizes": [9]},
    train_iters=2,
    train_overrides={
        **_TINY,
        "model.min_level": 3,
        "input.min_size_train": [64, 64],
        "input.max_size_train": 96,
    },
    timing_image=(64, 96),
    detections=5,
    maskrcnn_options={  # its mask head on 512 sampled boxes dominates a CPU's time otherwise
        "rpn_pre_nms_top_n_train": 40,
        "rpn_post_nms_top_n_train": 40,
        "rpn_pre_nms_top_n_test": 40,
        "rpn_post_nms_top_n_test": 40,
        "box_batch_size_per_image": 16,
    },
    window_shape=(1, 5, 5, 32, 48),
    lams=(1, 2, 4),
    warmup=0,
    repeats=1,
)


# ----------------------------------------------------------------------------- the run and its report
@dataclass
class Check:
    name: str
    status: str = "pass"  # pass | fail | skip
    seconds: float = 0.0
    summary: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    table: list[str] = field(default_factory=list)  # markdown lines for the report's details
    error: str = ""


@dataclass
class Result:
    """What a check function returns."""

    summary: str
    figures: dict[str, Any] = field(default_factory=dict)
    table: list[str] = field(default_factory=list)
    status: str = "pass"


class Run:
    def __init__(
        self,
        out: Path,
        device: torch.device,
        sizes: Sizes,
        budget_s: float,
        command: str,
        gpu: bool | None = None,
    ):
        self.out, self.device, self.sizes, self.command = out, device, sizes, command
        self.gpu = (
            device.type == "cuda" if gpu is None else gpu
        )  # gpu=True elsewhere: tests of the GPU branches
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.checks: list[Check] = []
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(
        self,
        name: str,
        fn: Callable[[Run], Result],
        *,
        gpu_only: bool = False,
        needs_s: float = 0.0,
        optional: bool = False,
    ) -> Check:
        """Runs one check and records it. gpu_only: skipped without a GPU. needs_s: skipped (a
        failure unless `optional`) when less time than that is left of the budget."""
        c = Check(name)
        if gpu_only and not self.gpu:
            c.status, c.summary = "skip", "skipped: no GPU"
        elif needs_s and self.left() < needs_s:
            c.status = "skip" if optional else "fail"
            c.summary = f"not run: {self.left():.0f} s of the {BUDGET_S:.0f} s budget left, it needs ~{needs_s:.0f} s"
        else:
            print(f"[gpu-check] {name} ...", flush=True)
            t0 = time.monotonic()
            try:
                r = fn(self)
                c.status, c.summary, c.figures, c.table = r.status, r.summary, r.figures, r.table
            except CheckFailed as e:
                c.status, c.summary = "fail", str(e)
            except Exception as e:  # noqa: BLE001 - any error is this check's failure, reported
                c.status, c.summary = "fail", f"{type(e).__name__}: {e}"[:600]
                c.error = traceback.format_exc()[-6000:]
            c.seconds = time.monotonic() - t0
            if self.gpu:
                torch.cuda.empty_cache()
        self.checks.append(c)
        print(f"[gpu-check] {name}: {c.status.upper()} ({c.seconds:.1f} s) {c.summary}", flush=True)
        if c.error:
            print(c.error, file=sys.stderr, flush=True)
        return c

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds of each function, run in turn each repeat (so load changes hit all alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


@contextlib.contextmanager
def _no_tf32():
    """float32 comparisons with the CPU: no TF32 matmuls/convolutions on Ampere and later."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return (
        torch.autocast(device_type=device.type, dtype=dtype)
        if dtype is not None
        else contextlib.nullcontext()
    )


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB"


def _finite(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    values = {k: float(v.detach().float()) for k, v in losses.items()}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise CheckFailed(f"non-finite losses {bad}")
    return values


# ----------------------------------------------------------------------------- 1. environment
def check_environment(run: Run) -> Result:
    missing = [m for m in REQUIRED_MODULES if not _installed(m)]
    absent = [m for m in ("ray", "mlflow", "pycocotools", "imgviz", "pyarrow") if not _installed(m)]
    figures: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
        "not_installed": absent,
    }
    if run.gpu:
        props = torch.cuda.get_device_properties(run.device)
        figures.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
            driver=_nvidia_smi("driver_version"),
        )
    import torchvision

    figures["torchvision"] = torchvision.__version__
    if missing:
        raise CheckFailed(f"modules missing: {missing} (needed: {list(REQUIRED_MODULES)})")
    where = (
        f"{figures['gpu']} (sm {figures['capability']}, {figures['gpu_memory_gib']} GiB)"
        if run.gpu
        else "no GPU"
    )
    return Result(
        f"{where}; torch {torch.__version__}, CUDA {torch.version.cuda}, Python {figures['python']}",
        figures,
    )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _nvidia_smi(field_name: str) -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return (
            out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
        )
    except (OSError, subprocess.SubprocessError):
        return ""


# ----------------------------------------------------------------------------- 2. build
def cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME")
    if home and Path(home, "bin", "nvcc").exists():
        return home
    try:
        found = subprocess.run(
            ["bash", str(REPO / "scripts" / "cuda_home.sh")],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        found = ""
    if found:
        return found
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def check_build(run: Run) -> Result:
    home = cuda_home()
    if not home:
        raise CheckFailed("no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)")
    major, minor = torch.cuda.get_device_capability(run.device)
    arch = f"{major}.{minor}"
    env = {
        **os.environ,
        "CUDA_HOME": home,
        "TORCH_CUDA_ARCH_LIST": arch,
        "MAX_JOBS": str(os.cpu_count() or 4),
    }
    env.pop("TENSORMASK_NO_CUDA", None)
    log = run.out / "build.log"
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    with log.open("w") as f:
        done = subprocess.run(
            cmd,
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=max(60.0, run.left() - 120),
        )
    text = log.read_text(errors="replace")
    if done.returncode != 0:
        raise CheckFailed(
            f"`{shlex.join(cmd)}` failed (exit {done.returncode}); last lines:\n"
            + "\n".join(text.splitlines()[-30:])
        )
    compiled = sorted(set(re.findall(r"(csrc/\S+\.(?:cu|cpp))", text)))
    nvcc = sorted({c for c in compiled if c.endswith(".cu")})
    info = subprocess.run(
        [sys.executable, "-m", "tensormask_ray.ops.build_info"],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    (run.out / "build_info.txt").write_text(info.stdout + info.stderr)
    if info.returncode != 0:
        raise CheckFailed(
            f"the built extension does not load or lacks kernels:\n{info.stdout}{info.stderr}"
        )
    registered = re.search(r"CUDA kernels registered: (\d+)/(\d+)", info.stdout)
    if (
        not registered
        or registered.group(1) != registered.group(2)
        or int(registered.group(1)) == 0
    ):
        raise CheckFailed(f"CUDA kernels not all registered:\n{info.stdout}")
    from torch.utils.cpp_extension import is_ninja_available

    ninja = is_ninja_available()
    return Result(
        f"sm {arch}, CUDA_HOME {home}; compiled {len(compiled)} files ({', '.join(nvcc) or 'no .cu'} with nvcc); "
        f"CUDA kernels registered {registered.group(1)}/{registered.group(2)}{'' if ninja else ' (no ninja: files compiled one after another)'}",
        {
            "arch": arch,
            "cuda_home": home,
            "compiled": compiled,
            "build_info": info.stdout.strip().splitlines(),
        },
    )


def check_build_info(run: Run) -> Result:
    """Without a GPU: what the installed extension provides (nothing is built)."""
    info = subprocess.run(
        [sys.executable, "-m", "tensormask_ray.ops.build_info"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if info.returncode != 0:
        raise CheckFailed(f"the installed extension does not load:\n{info.stdout}{info.stderr}")
    kernels = re.search(r"CUDA kernels registered: (\d+/\d+)", info.stdout)
    return Result(
        f"skipped the build (no GPU); installed extension loads, CUDA kernels registered {kernels.group(1) if kernels else '?'}",
        {"build_info": info.stdout.strip().splitlines()},
        status="skip",
    )


# ----------------------------------------------------------------------------- 3/7. op tests
def _pytest(run: Run, marker: str, name: str) -> dict[str, Any]:
    junit = run.out / f"{name}-junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests/ops",
        "-m",
        marker,
        "-q",
        "-rfE",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(30.0, run.left() - 30)
    )
    (run.out / f"{name}.log").write_text(done.stdout + done.stderr)
    if not junit.is_file():
        raise CheckFailed(
            f"pytest wrote no report (exit {done.returncode}):\n"
            + (done.stdout + done.stderr)[-3000:]
        )
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        counts["tests"] += 1
        for kind, key in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            if case.find(kind) is not None:
                counts[key] += 1
                if kind != "skipped":
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {
        "command": shlex.join(cmd),
        "counts": counts,
        "failed": failed,
        "returncode": done.returncode,
    }


def check_cuda_op_tests(run: Run) -> Result:
    r = _pytest(run, "gpu", "ops-cuda")
    c = r["counts"]
    summary = f"{c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped of {c['tests']} (`pytest tests/ops -m gpu`)"
    if not run.gpu:
        return Result(summary + "; they need a GPU", r, status="skip")
    if c["failures"] or c["errors"]:
        raise CheckFailed(summary + ": " + ", ".join(r["failed"][:20]))
    if c["passed"] == 0:
        raise CheckFailed(summary + ": no CUDA test ran (the extension lacks CUDA kernels?)")
    return Result(summary, r)


def check_cpu_op_tests(run: Run) -> Result:
    """An extra, run only with time left: stopped by the budget, it is skipped, not failed."""
    try:
        r = _pytest(run, "not gpu", "ops-cpu")
    except subprocess.TimeoutExpired:
        return Result(
            "stopped: the time budget ran out before the CPU op tests ended", status="skip"
        )
    c = r["counts"]
    summary = f"{c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped of {c['tests']} under torch {torch.__version__}"
    if c["failures"] or c["errors"]:
        raise CheckFailed(summary + ": " + ", ".join(r["failed"][:20]))
    return Result(summary, r)


# ----------------------------------------------------------------------------- 4. the model
def paper_config(run: Run, **extra):
    from tensormask_ray.config import load_config

    return load_config(preset="table2c-bipyramid", overrides={**run.sizes.model_overrides, **extra})


def synthetic_batch(n: int, h: int, w: int, num_classes: int, seed: int = 0):
    """Normalised-looking images with six rectangles each, and their targets (on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, h, w, generator=g)
    targets = []
    for _ in range(n):
        boxes, masks = [], []
        for _ in range(6):
            bw = int(torch.randint(max(8, w // 12), w // 2, (1,), generator=g))
            bh = int(torch.randint(max(8, h // 12), h // 2, (1,), generator=g))
            x0, y0 = (
                int(torch.randint(0, w - bw, (1,), generator=g)),
                int(torch.randint(0, h - bh, (1,), generator=g)),
            )
            m = torch.zeros(h, w, dtype=torch.uint8)
            m[y0 : y0 + bh, x0 : x0 + bw] = 1
            boxes.append([x0, y0, x0 + bw, y0 + bh])
            masks.append(m)
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.randint(0, num_classes, (6,), generator=g),
                "masks": torch.stack(masks),
                "iscrowd": torch.zeros(6, dtype=torch.bool),
            }
        )
    return images, targets


def _normalised(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (images - mean) / std


def _targets_to(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def train_step_losses(
    model, images, targets, device: torch.device, dtype: torch.dtype | None = None
) -> tuple[dict[str, float], float, float | None]:
    """One forward + backward on `device` -> (losses, global grad norm, peak GPU MiB)."""
    model.zero_grad(set_to_none=True)
    _reset_peak(device)
    with _autocast(device, dtype):
        losses = model(images.to(device), _targets_to(targets, device))
    values = _finite(losses)
    sum(losses.values()).backward()
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    norm = float(torch.stack(grads).norm()) if grads else 0.0
    if not math.isfinite(norm):
        raise CheckFailed(f"non-finite gradients (norm {norm}) with losses {values}")
    return values, norm, _peak_mib(device)


def check_model(run: Run) -> Result:
    from tensormask_ray.modeling import build_model

    h, w = run.sizes.image
    cfg = paper_config(run)
    torch.manual_seed(0)
    cpu_model = build_model(cfg).train()
    images, targets = synthetic_batch(2, h, w, cfg.model.num_classes)
    images = _normalised(images)
    what = f"R-{cfg.model.backbone.depth}-FPN {cfg.model.mask_head}, P{cfg.model.min_level}-P{cfg.model.max_level}, {h}x{w}, batch 2"
    if not run.gpu:
        losses, norm, _ = train_step_losses(cpu_model, images, targets, run.device)
        return Result(
            f"{what} on the CPU: losses finite {_fmt_losses(losses)}; the CUDA float32/bf16 runs were skipped (no GPU)",
            {"cpu_fp32": losses, "grad_norm": norm},
        )
    model = copy.deepcopy(cpu_model).to(run.device)
    with _no_tf32():
        fp32, norm32, peak32 = train_step_losses(model, images, targets, run.device)
    with torch.no_grad():
        cpu = _finite(cpu_model(images, targets))
    rel = {k: abs(fp32[k] - cpu[k]) / max(abs(cpu[k]), 1e-6) for k in cpu}
    bf16, norm16, peak16 = train_step_losses(model, images, targets, run.device, torch.bfloat16)
    rel16 = {k: abs(bf16[k] - fp32[k]) / max(abs(fp32[k]), 1e-6) for k in fp32}
    figures = {
        "cuda_fp32": fp32, "cpu_fp32": cpu, "rel_diff_cuda_cpu": rel, "cuda_bf16": bf16, "rel_diff_bf16_fp32": rel16,
        "grad_norm_fp32": norm32, "grad_norm_bf16": norm16, "peak_gpu_mib_fp32": peak32, "peak_gpu_mib_bf16": peak16,
    }  # fmt: skip
    table = [
        "| losses | " + " | ".join(cpu) + " | peak GPU memory (fwd+bwd) |",
        "|---|" + "---|" * len(cpu) + "---|",
        "| CPU float32 | " + " | ".join(f"{cpu[k]:.5f}" for k in cpu) + " | |",
        "| CUDA float32 (no TF32) | "
        + " | ".join(f"{fp32[k]:.5f}" for k in cpu)
        + f" | {_mib(peak32)} |",
        "| CUDA bf16 autocast | "
        + " | ".join(f"{bf16[k]:.5f}" for k in cpu)
        + f" | {_mib(peak16)} |",
    ]
    worst = max(rel.values())
    summary = (
        f"{what}: CUDA float32 = CPU within {worst:.1e} (relative); bf16 autocast finite (within {max(rel16.values()):.1e} "
        f"of float32); peak {_mib(peak32)} (fp32), {_mib(peak16)} (bf16)"
    )
    if worst > 2e-3:
        raise CheckFailed(
            f"{what}: CUDA float32 losses differ from the CPU's by up to {worst:.2e} (relative): {fp32} vs {cpu}"
        )
    return Result(summary, figures, table)


def _fmt_losses(losses: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in losses.items()) + "}"


# ----------------------------------------------------------------------------- 5. training
class _Recorder:
    """A MetricsLogger keeping what the loop logs."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(metrics)))


def demo_training_config(iterations: int, checkpoints: int = 6):
    """The demo's model and optimiser (tensormask_ray/demo.py) on the 4 synthetic classes."""
    from tensormask_ray.config import load_config
    from tensormask_ray.demo import DEMO_MODEL

    period = max(1, iterations // checkpoints)
    return load_config(
        preset="cpu-small",
        overrides=[
            *DEMO_MODEL,
            "model.num_classes=4",
            "solver.optimizer=adamw",
            "solver.base_lr=0.001",
            f"solver.max_iter={iterations}",
            f"solver.steps=[{int(iterations * 0.8)}]",
            f"solver.warmup_iters={min(20, max(1, iterations // 10))}",
            f"train.checkpoint_period={period}",
            f"train.log_period={max(1, period // 2)}",
        ],
    )


def check_training(run: Run) -> Result:
    from tensormask_ray.data.local import synthetic_batches
    from tensormask_ray.train.context import LocalContext
    from tensormask_ray.train.loop import RunSettings, run_training_loop

    iterations = run.sizes.train_iters
    cfg = demo_training_config(iterations)
    if run.sizes.train_overrides:  # the CPU path: a smaller model and image than the demo's
        from tensormask_ray.config import apply_overrides

        cfg = apply_overrides(cfg, run.sizes.train_overrides).validate()
    run_dir = run.work / "training"
    ctx = LocalContext(
        run.device,
        synthetic_batches(cfg, num_images=32, image_size=224, seed=0, style="simple"),
        run_dir,
        keep=1,
    )
    recorder = _Recorder()
    t0 = time.perf_counter()
    last = run_training_loop(cfg, ctx, RunSettings(run_dir=str(run_dir)), recorder)
    seconds = time.perf_counter() - t0
    losses = [float(r["train/loss"]) for r in ctx.reports]
    if last.get("iteration") != iterations or not losses:
        raise CheckFailed(f"the loop stopped at iteration {last.get('iteration')} of {iterations}")
    if not all(math.isfinite(v) for v in losses):
        raise CheckFailed(f"non-finite training loss: {losses}")
    rates = [m["train/images_per_sec"] for _, m in recorder.logged if "train/images_per_sec" in m][
        1:
    ]
    figures = {
        "iterations": iterations,
        "loss_per_checkpoint": losses,
        "checkpoint_iterations": [r["iteration"] for r in ctx.reports],
        "seconds": seconds,
        "images_per_sec": statistics.median(rates) if rates else None,
        "peak_gpu_mib": last.get("train/peak_gpu_mb_per_worker"),
    }
    table = [
        "| iteration | " + " | ".join(str(r["iteration"]) for r in ctx.reports) + " |",
        "|---|" + "---|" * len(losses),
        "| mean training loss since the previous checkpoint | "
        + " | ".join(f"{v:.3f}" for v in losses)
        + " |",
    ]
    ratio = losses[-1] / losses[0]
    what = f"demo model, {iterations} iterations on synthetic shapes in {seconds:.0f} s"
    if figures["images_per_sec"]:
        what += f" ({figures['images_per_sec']:.1f} images/s)"
    if run.gpu and ratio > 0.8:
        raise CheckFailed(
            f"{what}: the loss did not fall by 20% ({losses[0]:.3f} -> {losses[-1]:.3f})"
        )
    summary = f"{what}: loss {losses[0]:.3f} -> {losses[-1]:.3f} ({ratio:.2f}x)"
    if not run.gpu:
        summary += "; a few CPU iterations only check the loop (the loss must fall on the GPU run)"
    return Result(summary, figures, table)


# ----------------------------------------------------------------------------- 6. timings
def check_window_op_timings(run: Run) -> Result:
    from tensormask_ray.ops import api

    device, shape = run.device, run.sizes.window_shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    rows, figures = [], {}
    for lam in run.sizes.lams:
        xg = x.detach().requires_grad_(True)
        y = api.swap_align2nat(xg, lam, PAD)
        grad = torch.randn(y.shape, generator=g).to(device)
        dst = torch.empty_like(y)
        source = y.detach()
        with torch.no_grad():
            times = time_interleaved(
                {
                    "fwd": lambda lam=lam: api.swap_align2nat(x, lam, PAD),
                    "copy": lambda dst=dst, source=source: dst.copy_(source),
                },
                device, run.sizes.warmup, run.sizes.repeats,
            )  # fmt: skip
        times["bwd"] = time_interleaved(
            {
                "bwd": lambda y=y, xg=xg, grad=grad: torch.autograd.grad(
                    y, xg, grad, retain_graph=True
                )
            },
            device,
            run.sizes.warmup,
            run.sizes.repeats,
        )["bwd"]
        mib = y.numel() * y.element_size() / 2**20
        figures[f"lam{lam}"] = {**times, "out_shape": list(y.shape), "mib": mib}
        rows.append(
            f"| {lam} | {tuple(y.shape)} | {mib:.1f} | {1e3 * times['fwd']:.3f} | {1e3 * times['bwd']:.3f} | "
            f"{1e3 * times['copy']:.3f} | {times['fwd'] / times['copy']:.2f}x | {times['bwd'] / times['copy']:.2f}x |"
        )
        del xg, y, grad, dst, source
    table = [
        f"swap_align2nat, input (N, V, U, H, W) = {shape}, float32, {device.type}; median of {run.sizes.repeats} "
        f"(after {run.sizes.warmup} warm-up); copy = `dst.copy_(out)`, the same bytes read and written as the forward.",
        "",
        "| lam | output shape | MiB | forward ms | backward ms | copy ms | forward / copy | backward / copy |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    worst = max(v["fwd"] / v["copy"] for v in figures.values())
    return Result(
        f"swap_align2nat at lam {list(run.sizes.lams)}: forward at most {worst:.1f}x a copy of the same bytes",
        figures,
        table,
    )


def _maskrcnn(h: int, num_classes: int, detections: int, **options):
    """torchvision's Mask R-CNN R-50-FPN as its pretrained recipe builds it (frozen batch norm, the
    stem and res2 frozen, like TensorMask's backbone here), with random weights."""
    import torchvision
    from torchvision.models.detection import MaskRCNN
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    kwargs = dict(
        num_classes=num_classes + 1,
        min_size=h,
        max_size=1333,
        box_score_thresh=0.0,
        box_detections_per_img=detections,
        **options,
    )
    try:
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    except ImportError:  # a torchvision without it: its builder (batch norm, every layer trained)
        return torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, **kwargs
        )
    backbone = _resnet_fpn_extractor(
        torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3
    )
    return MaskRCNN(backbone, **kwargs)


def check_model_timings(run: Run) -> Result:
    """TensorMask (the paper's bipyramid R-50-FPN) vs torchvision's Mask R-CNN R-50-FPN, random
    weights, both forced to 100 detections (zero score thresholds): per-image inference and one
    training step (forward, backward, SGD step) of a batch of 2, fp32 and (GPU) bf16 autocast."""
    from tensormask_ray.modeling import build_model

    device, (h, w) = run.device, run.sizes.timing_image
    detections = run.sizes.detections
    cfg = paper_config(
        run,
        **{
            "inference.score_thresh": 0.0,
            "inference.detections_per_image": detections,
            "input.min_size_test": h,
        },
    )
    torch.manual_seed(0)
    tm = build_model(cfg).to(device)
    mr = _maskrcnn(h, cfg.model.num_classes, detections, **run.sizes.maskrcnn_options).to(device)
    images, targets = synthetic_batch(2, h, w, cfg.model.num_classes)
    norm = _normalised(images).to(device)
    images = images.to(device)
    tm_targets = _targets_to(targets, device)
    mr_targets = [
        {"boxes": t["boxes"], "labels": t["labels"] + 1, "masks": t["masks"]} for t in tm_targets
    ]
    tm_opt = torch.optim.SGD([p for p in tm.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    mr_opt = torch.optim.SGD([p for p in mr.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    precisions = [("fp32", None)] + ([("bf16", torch.bfloat16)] if run.gpu else [])
    rows, figures = [], {}
    for name, dtype in precisions:
        tm.eval()
        mr.eval()
        with torch.inference_mode(), _autocast(device, dtype):
            found = (
                tm(norm[:1], image_sizes=[(h, w)])[0]["scores"].numel(),
                mr([images[0]])[0]["scores"].numel(),
            )
            _reset_peak(device)
            inf = time_interleaved(
                {"tm": lambda: tm(norm[:1], image_sizes=[(h, w)]), "mr": lambda: mr([images[0]])},
                device,
                run.sizes.warmup,
                run.sizes.repeats,
            )
            peak_inf = _peak_mib(device)
        tm.train()
        mr.train()

        def tm_step(dtype=dtype):
            tm_opt.zero_grad(set_to_none=True)
            with _autocast(device, dtype):
                loss = sum(tm(norm, tm_targets).values())
            loss.backward()
            tm_opt.step()

        def mr_step(dtype=dtype):
            mr_opt.zero_grad(set_to_none=True)
            with _autocast(device, dtype):
                loss = sum(mr(list(images), mr_targets).values())
            loss.backward()
            mr_opt.step()

        _reset_peak(device)
        step = time_interleaved(
            {"tm": tm_step, "mr": mr_step}, device, run.sizes.warmup, run.sizes.repeats
        )
        peak_step = _peak_mib(device)
        figures[name] = {
            "inference": inf,
            "train_step": step,
            "detections": found,
            "peak_mib_inference": peak_inf,
            "peak_mib_train": peak_step,
        }
        rows.append(
            f"| inference, s/image, {name} | {inf['tm']:.4f} | {inf['mr']:.4f} | {inf['tm'] / inf['mr']:.2f}x | {found[0]} / {found[1]} detections, peak {_mib(peak_inf)} |"
        )
        rows.append(
            f"| training step, s (batch 2), {name} | {step['tm']:.4f} | {step['mr']:.4f} | {step['tm'] / step['mr']:.2f}x | fwd + bwd + SGD step, peak {_mib(peak_step)} |"
        )
    table = [
        f"Images {h}x{w}, random weights, both models forced to {detections} detections (zero score thresholds); median of "
        f"{run.sizes.repeats} timed alternately after {run.sizes.warmup} warm-up; bf16 = torch.autocast. TensorMask: "
        f"R-{cfg.model.backbone.depth}-FPN {cfg.model.mask_head}, V = {cfg.model.window_sizes}.",
        "",
        "| measure | TensorMask | Mask R-CNN (torchvision R-50-FPN) | TM / MR | note |",
        "|---|---|---|---|---|",
        *rows,
    ]
    fp32 = figures["fp32"]
    return Result(
        f"inference {fp32['inference']['tm'] / fp32['inference']['mr']:.2f}x and training step "
        f"{fp32['train_step']['tm'] / fp32['train_step']['mr']:.2f}x Mask R-CNN's time (fp32, {device.type}, {h}x{w})",
        figures,
        table,
    )


def check_detectron2(run: Run) -> Result:
    """Detectron2's SwapAlign2Nat CUDA kernel vs ours, if the user's environment has Detectron2's
    TensorMask extension. Its layout is (N, V*U, H, W) -> (N, lam*V * lam*U, ceil(H/lam),
    ceil(W/lam)); values are compared where the two geometries agree (lam*V odd), or at every lam
    with our geometry="detectron2" variant when the ops have it."""
    try:
        from tensormask import _C as d2  # noqa: N812 - Detectron2's name
    except Exception as e:  # noqa: BLE001 - anything here means: not available
        return Result(
            f"not available: Detectron2's TensorMask extension is not importable here (`from tensormask import _C`: {type(e).__name__})",
            status="skip",
        )
    if not hasattr(d2, "swap_align2nat_forward"):
        return Result("not available: `tensormask._C` has no swap_align2nat_forward", status="skip")
    if not run.gpu:
        return Result(
            "not compared: Detectron2's kernel is CUDA-only and there is no GPU", status="skip"
        )
    import inspect

    from tensormask_ray.ops import api

    d2_geometry = "geometry" in inspect.signature(api.swap_align2nat).parameters
    N, V, U, H, W = run.sizes.window_shape
    x = torch.randn((N, V, U, H, W), generator=torch.Generator().manual_seed(0)).to(run.device)
    flat = x.reshape(N, V * U, H, W).contiguous()
    rows, figures = [], {}
    for lam in run.sizes.lams:
        if d2_geometry:
            ours = lambda lam=lam: api.swap_align2nat(x, lam, PAD, geometry="detectron2")  # noqa: E731
        else:
            ours = lambda lam=lam: api.swap_align2nat(x, lam, PAD)  # noqa: E731
        with torch.no_grad():
            theirs_out = d2.swap_align2nat_forward(flat, lam, PAD)
            ours_out = ours()
            compared = d2_geometry or (lam * V) % 2 == 1
            diff = (
                float((ours_out.reshape(theirs_out.shape) - theirs_out).abs().max())
                if compared
                else None
            )
            times = time_interleaved(
                {"ours": ours, "d2": lambda lam=lam: d2.swap_align2nat_forward(flat, lam, PAD)},
                run.device,
                run.sizes.warmup,
                run.sizes.repeats,
            )
        figures[f"lam{lam}"] = {**times, "max_abs_diff": diff}
        rows.append(
            f"| {lam} | {1e3 * times['ours']:.3f} | {1e3 * times['d2']:.3f} | {times['d2'] / times['ours']:.2f}x | {'-' if diff is None else f'{diff:.2e}'} |"
        )
        if diff is not None and diff > 1e-4:
            raise CheckFailed(
                f"lam {lam}: ours and Detectron2's swap_align2nat differ by {diff:.2e}"
            )
    table = [
        f"swap_align2nat forward, (N, V, U, H, W) = {run.sizes.window_shape}, float32; values compared "
        + (
            'at every lam (our geometry="detectron2")'
            if d2_geometry
            else "where lam*V is odd (the geometries agree there)"
        ),
        "",
        "| lam | ours ms | Detectron2 ms | Detectron2 / ours | max abs difference |",
        "|---|---|---|---|---|",
        *rows,
    ]
    return Result("Detectron2's kernel timed against ours (table)", figures, table)


# ----------------------------------------------------------------------------- report
def machine_line(run: Run) -> str:
    env = next((c.figures for c in run.checks if c.name == "environment"), {})
    cpu = f"{env.get('cpus')} CPUs"
    if run.gpu:
        return (
            f"{env.get('gpu')} (sm {env.get('capability')}, {env.get('gpu_memory_gib')} GiB, driver {env.get('driver') or '?'}), "
            f"{cpu}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}), "
            f"torchvision {env.get('torchvision')}, Python {env.get('python')}"
        )
    return f"no GPU; {cpu}, torch {env.get('torch')}, torchvision {env.get('torchvision')}, Python {env.get('python')}"


def write_report(run: Run) -> tuple[Path, Path]:
    seconds = time.monotonic() - run.t0
    failed = [c.name for c in run.checks if c.status == "fail"]
    verdict = (
        f"**{len(failed)} of {len(run.checks)} checks FAILED: {', '.join(failed)}**"
        if failed
        else f"**no check failed** ({sum(c.status == 'pass' for c in run.checks)} passed, {sum(c.status == 'skip' for c in run.checks)} skipped)"
    )
    lines = [
        "## GPU",
        "",
        f"Command: `{run.command}` ({run.started:%Y-%m-%d %H:%M} UTC, {seconds:.0f} s).",
        f"Machine: {machine_line(run)}.",
        "",
    ]
    if not run.gpu:
        lines += [
            "**No GPU here: the GPU parts (build, CUDA op tests, CUDA float32/bf16 model, CUDA timings) were "
            "skipped; the torch-only parts ran on the CPU at small sizes.**",
            "",
        ]
    lines += [f"Result: {verdict}.", "", "| check | status | time | result |", "|---|---|---|---|"]
    for c in run.checks:
        summary = c.summary.replace("\n", " ").replace("|", "\\|")
        lines.append(f"| {c.name} | {c.status} | {c.seconds:.0f} s | {summary} |")
    for c in run.checks:
        if c.table:
            lines += ["", f"### {c.name}", "", *c.table]
    markdown = "\n".join(lines) + "\n"
    md_path, json_path = run.out / "gpu-check.md", run.out / "gpu-check.json"
    md_path.write_text(markdown)
    json_path.write_text(
        json.dumps(
            {
                "ok": run.ok,
                "gpu": run.gpu,
                "command": run.command,
                "started": run.started.isoformat(),
                "seconds": seconds,
                "machine": machine_line(run),
                "checks": [asdict(c) for c in run.checks],
            },
            indent=1,
            default=str,
        )
    )
    return md_path, json_path


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", help="folder for gpu-check.md, gpu-check.json and the logs")
    ap.add_argument("--no-build", action="store_true", help="use the extension already built here")
    ap.add_argument(
        "--budget",
        type=float,
        default=BUDGET_S,
        metavar="S",
        help=f"time budget in seconds (default {BUDGET_S:.0f})",
    )
    ap.add_argument(
        "--train-iters", type=int, help="training iterations (default 300 on a GPU, 4 on a CPU)"
    )
    ap.add_argument(
        "--write-results",
        action="store_true",
        help="also replace the '## GPU' section of benchmarks/RESULTS.md",
    )
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    sizes = GPU_SIZES if gpu else CPU_SIZES
    if args.train_iters:
        sizes = Sizes(**{**asdict(sizes), "train_iters": args.train_iters})
    command = "python scripts/gpu_check.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    run = Run(
        out,
        torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu"),
        sizes,
        args.budget,
        command,
    )
    torch.backends.cudnn.benchmark = False

    run.check("environment", check_environment)
    if gpu and not args.no_build:
        build = run.check("build", check_build)
    else:
        build = run.check("build", check_build_info)
    if build.status == "fail":
        for name in (
            "CUDA op tests",
            "model",
            "training",
            "window op timings",
            "TensorMask vs Mask R-CNN",
            "Detectron2 kernel",
        ):
            run.checks.append(Check(name, "fail", summary="not run: the build failed"))
    else:
        run.check("CUDA op tests", check_cuda_op_tests, needs_s=60)
        run.check("model", check_model, needs_s=45)
        run.check("training", check_training, needs_s=60)
        run.check("window op timings", check_window_op_timings, needs_s=15)
        run.check("TensorMask vs Mask R-CNN", check_model_timings, needs_s=45)
        run.check("Detectron2 kernel", check_detectron2, needs_s=10)
        if gpu:
            run.check("CPU op tests", check_cpu_op_tests, needs_s=90, optional=True)
    md, js = write_report(run)
    if args.write_results:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from results_md import write_section

        write_section("GPU", md.read_text().split("\n", 2)[2])
    print(
        f"[gpu-check] {'OK' if run.ok else 'FAILED'} in {time.monotonic() - run.t0:.0f} s; report: {md} and {js}",
        flush=True,
    )
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""`scripts/gpu_check.py` (make gpu-check) on a machine without a GPU, as the GPU machine runs it:
in a fresh process where Ray, MLflow, pycocotools and imgviz cannot be imported. It must finish,
say that the GPU parts were skipped and report the torch-only parts. Its GPU branches are driven
with the stand-in accelerator (tests/device), so a tensor of the check itself left on the CPU fails
here, not on the GPU."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ..device.stand_in import stand_in_device

REPO = Path(__file__).resolve().parents[2]
ABSENT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "pycocotools", "imgviz")
BLOCKER = f'''
import sys

class _Absent:
    """Imports of what the GPU machine lacks fail, as they would there."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_ON_THE_GPU_MACHINE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: the GPU machine has none)")
        return None

sys.meta_path.insert(0, _Absent())
'''


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path of a machine without a GPU")
def test_cpu_path_runs_without_ray_mlflow_or_pycocotools_and_says_what_was_skipped(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)  # in every Python process the check starts
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert report["ok"] and not report["gpu"]
    assert status == {
        "environment": "pass",
        "build": "skip",
        "CUDA op tests": "skip",
        "model": "pass",
        "training": "pass",
        "window op timings": "pass",
        "TensorMask vs Mask R-CNN": "pass",
        "Detectron2 kernel": "skip",
    }
    env_figures = next(c["figures"] for c in report["checks"] if c["name"] == "environment")
    assert set(ABSENT_ON_THE_GPU_MACHINE) <= set(env_figures["not_installed"])  # the blocker worked
    cuda_tests = next(c for c in report["checks"] if c["name"] == "CUDA op tests")
    assert cuda_tests["figures"]["counts"]["tests"] > 0  # collected, skipped for want of a GPU
    markdown = (out / "gpu-check.md").read_text()
    assert markdown.startswith("## GPU\n") and "Command: `python scripts/gpu_check.py" in markdown
    assert "No GPU here: the GPU parts" in markdown and "were skipped" in markdown
    assert "| TensorMask vs Mask R-CNN | pass |" in markdown and "not available" in markdown


def test_the_checks_gpu_branches_keep_their_tensors_on_the_device(tmp_path, monkeypatch):
    """check_model (CUDA vs CPU comparison, bf16 pass) and the window-op timings, with `gpu=True`
    on the stand-in device (the model timings run on the CPU path only: Mask R-CNN is too slow
    through the stand-in's Python dispatch). Left out: autocast, which needs a real device type, and inference mode
    (stand-in tensors cannot be inference tensors; no_grad instead)."""
    gc = _load_script()
    monkeypatch.setattr(gc, "_autocast", lambda device, dtype: contextlib.nullcontext())
    monkeypatch.setattr(torch, "inference_mode", torch.no_grad)
    sizes = gc.Sizes(**{**gc.asdict(gc.CPU_SIZES), "image": (64, 96), "lams": (1, 2)})
    with stand_in_device() as device:
        run = gc.Run(tmp_path, device, sizes, budget_s=600, command="test", gpu=True)
        model = gc.check_model(run)
        windows = gc.check_window_op_timings(run)
    assert model.status == "pass" and max(model.figures["rel_diff_cuda_cpu"].values()) == 0.0
    assert windows.figures["lam2"]["out_shape"] == [1, 10, 10, 16, 24]

# The one place the README's commands live:  make demo   and   make test
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Which kernels the installed extension has: `cuda` (the CPU and the CUDA kernels, when a CUDA
# toolkit is found) or `cpu`. The stamp's name says which was built, so asking for the other rebuilds.
# `make test` (what CI runs) always compiles the CUDA code, so a broken kernel fails CI; `make demo`
# and `make install` on a machine without a working GPU (no `nvidia-smi -L`) build the CPU kernels
# only (no nvcc: 153 s instead of 198 s here, 2 cores, load ~25). A CUDA build serves the demo too.
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
STAMP = $(VENV)/.tensormask-installed-$(1)
KERNELS ?= $(if $(HAVE_GPU),cuda,cpu)
DEMO_KERNELS := $(if $(wildcard $(call STAMP,cuda)),cuda,$(KERNELS))
# torch/torchvision as this machine has them on disk (../shared/NOTES.md). On a GPU machine with
# its own torch already in the venv, nothing is reinstalled.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# A short arch list keeps the CUDA build fast here and in CI; the cluster image builds more.
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
CUDA_HOME ?= $(shell scripts/cuda_home.sh)
MAX_JOBS ?= 2
PYTEST_ARGS ?=
export MLFLOW_DISABLE_TELEMETRY=true
export RAY_USAGE_STATS_ENABLED=0

SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: install test demo lint bench clean gpu-check

install: $(call STAMP,$(KERNELS))

$(call STAMP,%): $(SOURCES)
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PIP) install -q --upgrade pip setuptools wheel 2>&1 | grep -v "is ignored" || true
	@if $(PY) -c "import torch, torchvision" 2>/dev/null; then \
	  echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed"; \
	else \
	  echo "Installing $(TORCH_SPEC)"; $(PIP) install -q $(TORCH_SPEC) 2>&1 | grep -v "is ignored" || true; \
	fi
	@$(PY) -c "import torch, torchvision" || { echo "ERROR: torch/torchvision failed to install"; exit 1; }
	@$(PIP) install -q ninja 2>&1 | grep -v "is ignored" || true
	@mkdir -p build
	@if [ "$*" = cpu ]; then echo "Building tensormask_ray._C: CPU kernels only (no GPU here; make test compiles the CUDA ones)"; \
	  elif [ -n "$(CUDA_HOME)" ]; then echo "Building tensormask_ray._C: CPU kernels + CUDA kernels (CUDA_HOME=$(CUDA_HOME), arch $(TORCH_CUDA_ARCH_LIST))"; \
	  else echo "Building tensormask_ray._C: CPU kernels (no CUDA toolkit found)"; fi
	@rm -f $(call STAMP,cpu) $(call STAMP,cuda)
	@# An empty CUDA_HOME means a CPU-only build: torch would otherwise find nvcc on PATH itself.
	@CUDA_HOME="$(if $(filter cuda,$*),$(CUDA_HOME))" TENSORMASK_NO_CUDA=$(if $(and $(filter cuda,$*),$(CUDA_HOME)),$${TENSORMASK_NO_CUDA:-0},1) \
	  TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" MAX_JOBS=$(MAX_JOBS) \
	  $(PIP) install -v --no-build-isolation -e '.[dev]' > build/install.log 2>&1 \
	  || { grep -v "is ignored" build/install.log | tail -n 80; echo "ERROR: building/installing tensormask-ray failed (full log: build/install.log)"; exit 1; }
	@echo "nvcc compilations in this build: $$(grep -cE '/nvcc .* -c .*\.cu' build/install.log || true)"
	@grep -oE '[^ /]+\.cu -o' build/install.log | sed 's/ -o//' | sort -u | sed 's/^/  compiled with nvcc: /' || true
	@$(PY) -m tensormask_ray.ops.build_info
	@touch $@

test: $(call STAMP,cuda)
	$(VENV)/bin/ruff check tensormask_ray tests benchmarks scripts
	$(VENV)/bin/ruff format --check tensormask_ray tests benchmarks scripts
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(call STAMP,$(DEMO_KERNELS))
	$(VENV)/bin/tensormask-ray demo

# The one-shot check of a GPU machine (docs/cluster.md): needs only torch, torchvision, numpy, Pillow,
# PyYAML and pytest, builds the extension in place for the GPU present (no `make install`), at most
# 8 minutes on one GPU; without a GPU it runs its torch-only parts on the CPU. Report in $(GPU_CHECK_OUT).
GPU_CHECK_OUT ?= gpu-check-report
gpu-check:
	@py=$$( [ -x $(PY) ] && echo $(PY) || command -v python3 ); $$py scripts/gpu_check.py $(GPU_CHECK_OUT)

bench: $(call STAMP,$(DEMO_KERNELS))
	$(PY) benchmarks/ops.py

clean:
	rm -rf build *.egg-info tensormask_ray/_C*.so $(call STAMP,cpu) $(call STAMP,cuda)

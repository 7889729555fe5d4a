#!/usr/bin/env bash
# Prints the CUDA toolkit folder to use as CUDA_HOME, or nothing if none is found.
# `nvcc` on PATH may be a wrapper script (`exec /usr/local/cuda-X/bin/nvcc "$@"`): follow it.
set -u
if [ -n "${CUDA_HOME:-}" ] && [ -x "${CUDA_HOME}/bin/nvcc" ]; then echo "$CUDA_HOME"; exit 0; fi
nvcc_path=$(command -v nvcc 2>/dev/null || true)
if [ -n "$nvcc_path" ]; then
  real=$(readlink -f "$nvcc_path")
  if file_head=$(head -c 2 "$real" 2>/dev/null) && [ "$file_head" = "#!" ]; then
    target=$(grep -oE '/[^" ]*/bin/nvcc' "$real" | head -n 1)
    [ -n "$target" ] && real=$(readlink -f "$target")
  fi
  dir=$(dirname "$(dirname "$real")")
  if [ -x "$dir/bin/nvcc" ]; then echo "$dir"; exit 0; fi
fi
for d in /usr/local/cuda /usr/local/cuda-*; do
  if [ -x "$d/bin/nvcc" ]; then echo "$d"; exit 0; fi
done
exit 0

"""Builds the TensorMask tensor ops in csrc/ as the extension `tensormask_ray._C`.

The CPU kernels are always built. The CUDA kernels are built whenever a CUDA toolkit is found
(CUDA_HOME, or nvcc on PATH). Set TENSORMASK_NO_CUDA=1 to skip them explicitly.
If the build fails, pip fails and prints why: there is no silent fallback.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # -ffp-contract=off: a*b + c stays a rounded product and a rounded sum (GCC contracts it to
    # an fma by default when the target has one). The kernels write every fma they want
    # explicitly; the Detectron2 variant's sums must not be fused (csrc/window_math.h).
    cxx_flags = ["-O3", "-ffp-contract=off"]
    with_cuda = CUDA_HOME is not None and os.environ.get("TENSORMASK_NO_CUDA", "0") != "1"
    if with_cuda:
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "tensormask_ray._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("TENSORMASK_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    return CppExtension(
        "tensormask_ray._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})

// CUDA kernels of the TensorMask window ops (csrc/window_math.h has the shared math).
//
// Forward: one thread per output element (grid-stride loop), forward_element() (d2_forward_element()
// for swap_align2nat_detectron2).
// Backward: one thread per input element (a gather, no atomics), backward_element()
// (d2_backward_element()): each thread adds its terms in a fixed order (window_math.h), so the
// result is deterministic, and equal to the CPU kernel's (which adds the same terms in the same
// order).
// 32-bit indexing when the tensors allow it, 64-bit otherwise. half/bfloat16 compute in float.
// Launched on the current stream (c10::cuda::getCurrentCUDAStream, which at::cuda re-exports); no
// synchronisation. Only c10 CUDA headers are used: ATen/cuda/CUDAContext.h would also need the
// cuSPARSE/cuBLAS headers, which a bare CUDA toolkit (as on the CI machine) does not have.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "window_ops.h"

namespace tensormask {
namespace {

constexpr int kThreads = 256;

// Enough blocks to fill the device (grid-stride loops cover the rest).
inline int64_t num_blocks(int64_t n) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &sm_count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t max_blocks = static_cast<int64_t>(std::max(sm_count, 1)) * 32;
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks));
}

// kDetectron2: swap_align2nat_detectron2 (d2_forward_element, whose pad enters the weighted sum in
// opmath); otherwise forward_element (pad written as scalar_t).
template <typename scalar_t, typename index_t, bool kDetectron2>
__global__ void window_forward_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ out, const WindowGeometry g,
    const at::opmath_type<scalar_t> pad_value, const index_t numel) {
  using opmath_t = at::opmath_type<scalar_t>;
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    index_t r = i;
    const index_t xp = r % static_cast<index_t>(g.Wo);
    r /= static_cast<index_t>(g.Wo);
    const index_t yp = r % static_cast<index_t>(g.Ho);
    r /= static_cast<index_t>(g.Ho);
    const index_t up = r % static_cast<index_t>(g.Uo);
    r /= static_cast<index_t>(g.Uo);
    const index_t vp = r % static_cast<index_t>(g.Vo);
    const index_t n = r / static_cast<index_t>(g.Vo);
    if (kDetectron2) {
      out[i] = d2_forward_element<scalar_t, opmath_t>(x, g, n, vp, up, yp, xp, pad_value);
    } else {
      out[i] = forward_element<scalar_t, opmath_t>(
          x, g, n, vp, up, yp, xp, static_cast<scalar_t>(pad_value));
    }
  }
}

template <typename scalar_t, typename index_t, bool kDetectron2>
__global__ void window_backward_kernel(
    const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ grad_x, const WindowGeometry g,
    const index_t numel) {
  using opmath_t = at::opmath_type<scalar_t>;
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    index_t r = i;
    const index_t X = r % static_cast<index_t>(g.W);
    r /= static_cast<index_t>(g.W);
    const index_t Y = r % static_cast<index_t>(g.H);
    r /= static_cast<index_t>(g.H);
    const index_t u = r % static_cast<index_t>(g.U);
    r /= static_cast<index_t>(g.U);
    const index_t v = r % static_cast<index_t>(g.V);
    const index_t n = r / static_cast<index_t>(g.V);
    grad_x[i] = static_cast<scalar_t>(
        kDetectron2 ? d2_backward_element<scalar_t, opmath_t>(grad_out, g, n, v, u, Y, X)
                    : backward_element<scalar_t, opmath_t>(grad_out, g, n, v, u, Y, X));
  }
}

bool fits_int32(const at::Tensor& a, const at::Tensor& b) {
  // + a grid's worth of slack so that i + stride cannot overflow.
  const int64_t limit = std::numeric_limits<int32_t>::max() / 2;
  return a.numel() < limit && b.numel() < limit;
}

at::Tensor window_forward_cuda(const at::Tensor& input, const WindowGeometry& g, double pad_value) {
  TORCH_CHECK(input.is_cuda(), "tensormask: expected a CUDA tensor");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty({g.N, g.Vo, g.Uo, g.Ho, g.Wo}, x.options());
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool small = fits_int32(x, out);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "tensormask_window_forward_cuda", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        // The paper ops write pad as scalar_t (rounded from opmath, the same value); Detectron2's
        // sums it in opmath.
        const opmath_t pad = g.sampling == kDetectron2Sampling
                                 ? static_cast<opmath_t>(pad_value)
                                 : static_cast<opmath_t>(static_cast<scalar_t>(pad_value));
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        const int64_t blocks = num_blocks(numel);
        if (g.sampling == kDetectron2Sampling) {
          if (small) {
            window_forward_kernel<scalar_t, int32_t, true>
                <<<blocks, kThreads, 0, stream>>>(xp, op, g, pad, static_cast<int32_t>(numel));
          } else {
            window_forward_kernel<scalar_t, int64_t, true>
                <<<blocks, kThreads, 0, stream>>>(xp, op, g, pad, numel);
          }
        } else if (small) {
          window_forward_kernel<scalar_t, int32_t, false>
              <<<blocks, kThreads, 0, stream>>>(xp, op, g, pad, static_cast<int32_t>(numel));
        } else {
          window_forward_kernel<scalar_t, int64_t, false>
              <<<blocks, kThreads, 0, stream>>>(xp, op, g, pad, numel);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

at::Tensor window_backward_cuda(const at::Tensor& grad, const WindowGeometry& g) {
  TORCH_CHECK(grad.is_cuda(), "tensormask: expected a CUDA tensor");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor go = grad.contiguous();
  at::Tensor gx = at::empty({g.N, g.V, g.U, g.H, g.W}, go.options());
  const int64_t numel = gx.numel();
  if (numel == 0) return gx;
  if (go.numel() == 0) return gx.zero_();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool small = fits_int32(go, gx);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, go.scalar_type(), "tensormask_window_backward_cuda", [&] {
        const scalar_t* gop = go.const_data_ptr<scalar_t>();
        scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
        const int64_t blocks = num_blocks(numel);
        if (g.sampling == kDetectron2Sampling) {
          if (small) {
            window_backward_kernel<scalar_t, int32_t, true>
                <<<blocks, kThreads, 0, stream>>>(gop, gxp, g, static_cast<int32_t>(numel));
          } else {
            window_backward_kernel<scalar_t, int64_t, true>
                <<<blocks, kThreads, 0, stream>>>(gop, gxp, g, numel);
          }
        } else if (small) {
          window_backward_kernel<scalar_t, int32_t, false>
              <<<blocks, kThreads, 0, stream>>>(gop, gxp, g, static_cast<int32_t>(numel));
        } else {
          window_backward_kernel<scalar_t, int64_t, false>
              <<<blocks, kThreads, 0, stream>>>(gop, gxp, g, numel);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return gx;
}

using CudaOps = WindowOps<&window_forward_cuda, &window_backward_cuda>;

}  // namespace
}  // namespace tensormask

TORCH_LIBRARY_IMPL(tensormask, CUDA, m) {
  TENSORMASK_IMPL_WINDOW_OPS(m, tensormask::CudaOps);
}

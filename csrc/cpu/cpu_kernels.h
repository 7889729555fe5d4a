// What the CPU kernel files share: the run-time choice of the AVX2+FMA clones, the elementwise
// test mode, index helpers, and the kernel families each file implements.
//
//   window_ops_cpu.cpp  the operator entry points; shifted copies (identity, nearest); the
//                       elementwise mode (the CUDA kernels' per-element functions, for tests)
//   bilinear_cpu.cpp    bilinear window-grid resampling (up_align2nat, swap_align2nat)
//   detectron2_cpu.cpp  swap_align2nat_detectron2
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

#include "window_math.h"

// On x86-64 the hot loops are compiled twice: for the baseline ISA (std::fma is a libm call) and
// with this attribute (one instruction, vectorisable); use_fma_clone() picks one at run time.
#if defined(__GNUC__) && defined(__x86_64__)
#define TM_HAVE_FMA_CLONE 1
#define TM_TARGET_AVX2_FMA __attribute__((target("avx2,fma")))
#else
#define TM_HAVE_FMA_CLONE 0
#define TM_TARGET_AVX2_FMA
#endif

namespace tensormask {
namespace cpu {

// Whether to call the AVX2+FMA clones: the CPU has AVX2 and FMA, and TENSORMASK_CPU_FMA is not 0
// (the tests set it to check that both clones give the same bits).
bool use_fma_clone();

// at::empty(sizes, options), whose 2 MiB-aligned interior (when there is one) is advised to the
// kernel as MADV_HUGEPAGE (Linux) before the kernels write it. They write their outputs (read
// their grads) a short row per window plane, each plane in another 4 KiB page: with small pages
// nearly every row is a TLB miss, and a fresh output's first touch of each of its pages a page
// fault (zeroing 4 KiB at a time). Huge pages remove both; torch gives every allocation the same
// advice under THP_MEM_ALLOC_ENABLE=1. Advice only: with THP set to "never", or no huge page
// free, small pages are used. TENSORMASK_CPU_HUGEPAGES=0 skips it.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// TENSORMASK_CPU_KERNEL=elementwise: one call per element of the functions the CUDA kernels run
// per thread, instead of the row kernels (tests only).
bool use_elementwise();

// Output positions q in [0, out_len) whose input position s*q + off lies in [0, in_len): [lo, hi)
// with 0 <= lo <= hi <= out_len.
inline void valid_range(
    int64_t off, int64_t s, int64_t in_len, int64_t out_len, int64_t* lo, int64_t* hi) {
  int64_t l = floor_div(-off + s - 1, s);  // ceil(-off / s)
  int64_t h = floor_div(in_len - 1 - off, s) + 1;
  l = std::min<int64_t>(std::max<int64_t>(l, 0), out_len);
  h = std::min<int64_t>(h, out_len);
  *lo = l;
  *hi = std::max(h, l);
}

// ---- row helpers (inlined into each caller, so into its AVX2+FMA clone too) ------------------

// Requests the n values at p into the cache (for reading, or for writing: prefetch_row_w).
template <typename T>
C10_ALWAYS_INLINE void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
  __builtin_prefetch(c + bytes - 1);
}
template <typename T>
C10_ALWAYS_INLINE void prefetch_row_w(T* p, int64_t n) {
  char* c = reinterpret_cast<char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b, 1);
  __builtin_prefetch(c + bytes - 1, 1);
}

// d_t[q + start] += w_t * src[q] for q in [lo, hi) and the four distinct target rows d_t of one
// grad row (both window axes with two distinct taps): one pass over src (one loop, one load per
// value) instead of four; each target's own sum is unchanged (same terms, same order).
template <typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void accumulate_four(
    const scalar_t* __restrict src, opmath_t* __restrict d00, opmath_t* __restrict d01,
    opmath_t* __restrict d10, opmath_t* __restrict d11, opmath_t w00, opmath_t w01, opmath_t w10,
    opmath_t w11, int64_t start, int64_t lo, int64_t hi) {
  for (int64_t q = lo; q < hi; ++q) {
    const opmath_t x = static_cast<opmath_t>(src[q]);
    d00[q + start] = tm_fma(w00, x, d00[q + start]);
    d01[q + start] = tm_fma(w01, x, d01[q + start]);
    d10[q + start] = tm_fma(w10, x, d10[q + start]);
    d11[q + start] = tm_fma(w11, x, d11[q + start]);
  }
}

// Splits a row by column phase: dst[r*K + k] = src[s*k + r] for X = s*k + r < W (K >= ceil(W/s)),
// converted (to opmath). kS: s as a compile-time constant (the loop then vectorises), 0 for any.
template <int kS, typename src_t, typename dst_t>
C10_ALWAYS_INLINE void stage_row_s(
    const src_t* __restrict src, dst_t* __restrict dst, int64_t s, int64_t K, int64_t W) {
  const int64_t S = kS > 0 ? kS : s;
  const int64_t full = W / S;  // the k with all S phases inside the row
  for (int64_t k = 0; k < full; ++k) {
    for (int64_t r = 0; r < S; ++r) dst[r * K + k] = static_cast<dst_t>(src[S * k + r]);
  }
  for (int64_t X = full * S; X < W; ++X) {
    dst[(X - full * S) * K + full] = static_cast<dst_t>(src[X]);
  }
}

// The inverse: dst[s*k + r] = src[r*K + k], converted (to scalar_t).
template <int kS, typename src_t, typename dst_t>
C10_ALWAYS_INLINE void unstage_row_s(
    const src_t* __restrict src, dst_t* __restrict dst, int64_t s, int64_t K, int64_t W) {
  const int64_t S = kS > 0 ? kS : s;
  const int64_t full = W / S;
  for (int64_t k = 0; k < full; ++k) {
    for (int64_t r = 0; r < S; ++r) dst[S * k + r] = static_cast<dst_t>(src[r * K + k]);
  }
  for (int64_t X = full * S; X < W; ++X) {
    dst[X] = static_cast<dst_t>(src[(X - full * S) * K + full]);
  }
}

// stage_row_s / unstage_row_s with the strides of TensorMask's lambdas compiled in.
template <typename src_t, typename dst_t>
C10_ALWAYS_INLINE void stage_row(const src_t* src, dst_t* dst, int64_t s, int64_t K, int64_t W) {
  switch (s) {
    case 1: return stage_row_s<1>(src, dst, s, K, W);
    case 2: return stage_row_s<2>(src, dst, s, K, W);
    case 4: return stage_row_s<4>(src, dst, s, K, W);
    case 8: return stage_row_s<8>(src, dst, s, K, W);
    case 16: return stage_row_s<16>(src, dst, s, K, W);
    case 32: return stage_row_s<32>(src, dst, s, K, W);
    default: return stage_row_s<0>(src, dst, s, K, W);
  }
}
template <typename src_t, typename dst_t>
C10_ALWAYS_INLINE void unstage_row(const src_t* src, dst_t* dst, int64_t s, int64_t K, int64_t W) {
  switch (s) {
    case 1: return unstage_row_s<1>(src, dst, s, K, W);
    case 2: return unstage_row_s<2>(src, dst, s, K, W);
    case 4: return unstage_row_s<4>(src, dst, s, K, W);
    case 8: return unstage_row_s<8>(src, dst, s, K, W);
    case 16: return unstage_row_s<16>(src, dst, s, K, W);
    case 32: return unstage_row_s<32>(src, dst, s, K, W);
    default: return unstage_row_s<0>(src, dst, s, K, W);
  }
}

// Bilinear resampling of the window grid (g.mode == kBilinear, paper sampling): out is allocated
// (g's output shape), x / grad contiguous.
void bilinear_forward(const at::Tensor& x, at::Tensor& out, const WindowGeometry& g, double pad);
void bilinear_backward(const at::Tensor& grad, at::Tensor& grad_x, const WindowGeometry& g);

// swap_align2nat_detectron2 (g.sampling == kDetectron2Sampling), likewise.
void detectron2_forward(
    const at::Tensor& x, at::Tensor& out, const WindowGeometry& g, double pad);
void detectron2_backward(const at::Tensor& grad, at::Tensor& grad_x, const WindowGeometry& g);

}  // namespace cpu
}  // namespace tensormask

// CPU kernels of the TensorMask window ops: the operator entry points, and the kernels of the
// ops that copy (see csrc/window_math.h for the computation they share with the CUDA kernels;
// cpu_kernels.h for the other CPU kernel files).
//
// Entry points: window_forward_cpu / window_backward_cpu route each geometry to its kernel:
// bilinear window-grid resampling (up_align2nat, swap_align2nat) to bilinear_cpu.cpp,
// swap_align2nat_detectron2 to detectron2_cpu.cpp, and identity / nearest (align2nat, nat2align,
// up_align2nat nearest), which copy, to the kernels here:
// Forward: parallel over (n, v') slabs of the output; then u', then y', then a contiguous x' loop
// whose in-bounds range is computed once per row (pad outside it): a shifted copy.
// Backward: identity is the opposite shift; nearest a gather, parallel over (n, v, u) planes of
// grad_x, each row of which accumulates the rows of grad_out that read it, in the same order as
// the CUDA kernel's per-element loop (v' ascending, then u' ascending), so the result is
// deterministic and equal to the CUDA one.
//
// FMA: every multiply-add is an explicit fma (matching ATen's bits). On x86-64 the hot loops are
// compiled twice, once for the baseline ISA (fma is a libm call) and once with
// __attribute__((target("avx2,fma"))) (one instruction, vectorisable), and the AVX2+FMA clone is
// picked at run time when the CPU has it. Both give identical results (fma is exactly rounded).
// TENSORMASK_CPU_FMA=0 forces the baseline clone (used by the tests).
//
// TENSORMASK_CPU_KERNEL=elementwise (for the tests) replaces the row loops with one call per
// element of forward_element() / backward_element() (d2_*), the very functions the CUDA kernels
// run per thread: it checks the CUDA kernels' arithmetic on a machine without a GPU.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/cpu_kernels.h"
#include "window_ops.h"

namespace tensormask {
namespace cpu {

bool use_fma_clone() {
#if TM_HAVE_FMA_CLONE
  static const bool enabled = [] {
    const char* env = std::getenv("TENSORMASK_CPU_FMA");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return enabled;
#else
  return false;
#endif
}

bool use_elementwise() {
  static const bool enabled = [] {
    const char* env = std::getenv("TENSORMASK_CPU_KERNEL");
    return env != nullptr && std::strcmp(env, "elementwise") == 0;
  }();
  return enabled;
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* env = std::getenv("TENSORMASK_CPU_HUGEPAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = end & ~(kHuge - 1);
  if (enabled && hi > lo) {
    // Advice only: where the kernel has no huge page to give (or THP is off), small pages stay.
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return t;
}

}  // namespace cpu

namespace {

using cpu::use_elementwise;
using cpu::use_fma_clone;
using cpu::valid_range;

template <typename scalar_t>
inline void fill(scalar_t* p, int64_t n, scalar_t value) {
  std::fill(p, p + std::max<int64_t>(n, 0), value);
}

// ---- forward: one (n, v') slab of the output (identity, nearest) ----------------------------

template <typename scalar_t, bool kUnit>
C10_ALWAYS_INLINE void copy_slab(
    const scalar_t* x, scalar_t* out, const WindowGeometry& g, scalar_t pad, int64_t n,
    int64_t vp) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t HW = g.H * g.W;
  const int64_t out_plane = g.Ho * g.Wo;
  const int64_t s = kUnit ? 1 : g.s;
  const AxisTap<opmath_t> tv = axis_tap<opmath_t>(vp, g.V, g.Vo, g.mode);
  const int64_t off_v = g.a * (vp - g.Vo / 2);
  int64_t y_lo, y_hi;
  valid_range(off_v, s, g.H, g.Ho, &y_lo, &y_hi);
  const scalar_t* xn = x + n * g.V * g.U * HW;
  scalar_t* slab = out + (n * g.Vo + vp) * g.Uo * out_plane;

  for (int64_t up = 0; up < g.Uo; ++up) {
    scalar_t* o = slab + up * out_plane;
    const int64_t off_u = g.a * (up - g.Uo / 2);
    int64_t x_lo, x_hi;
    valid_range(off_u, s, g.W, g.Wo, &x_lo, &x_hi);
    if (x_lo >= x_hi || y_lo >= y_hi) {
      fill(o, out_plane, pad);
      continue;
    }
    fill(o, y_lo * g.Wo, pad);
    fill(o + y_hi * g.Wo, (g.Ho - y_hi) * g.Wo, pad);
    const AxisTap<opmath_t> tu = axis_tap<opmath_t>(up, g.U, g.Uo, g.mode);
    const scalar_t* p = xn + (tv.i0 * g.U + tu.i0) * HW;  // the plane x[n, v*, u*]
    for (int64_t yp = y_lo; yp < y_hi; ++yp) {
      scalar_t* row = o + yp * g.Wo;
      fill(row, x_lo, pad);
      fill(row + x_hi, g.Wo - x_hi, pad);
      // Offset of (Y, X) within the plane, minus s*x' (only x' in [x_lo, x_hi) are read).
      const int64_t base = (s * yp + off_v) * g.W + off_u;
      if (kUnit) {
        std::memcpy(row + x_lo, p + base + x_lo, sizeof(scalar_t) * (x_hi - x_lo));
      } else {
        for (int64_t q = x_lo; q < x_hi; ++q) row[q] = p[base + s * q];
      }
    }
  }
}

template <typename scalar_t>
using CopySlabFn = void (*)(const scalar_t*, scalar_t*, const WindowGeometry&, scalar_t, int64_t,
                            int64_t);

template <typename scalar_t>
CopySlabFn<scalar_t> pick_copy(const WindowGeometry& g) {
  return g.s == 1 ? &copy_slab<scalar_t, true> : &copy_slab<scalar_t, false>;
}

// ---- backward: one (n, v, u) plane of grad_x (nearest) ----------------------------------------

template <typename opmath_t>
struct UTerm {
  int64_t up;  // output window index u'
  int64_t off;  // X = s*x' + off
  int64_t x_lo, x_hi;  // x' range with X in [0, W)
  opmath_t w;  // w_u(u' -> u)
};

template <typename scalar_t, bool kUnit>
C10_ALWAYS_INLINE void backward_plane(
    const scalar_t* grad_out, scalar_t* grad_x, const WindowGeometry& g, int64_t n, int64_t v,
    int64_t u, at::opmath_type<scalar_t>* acc, UTerm<at::opmath_type<scalar_t>>* uterms) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t s = kUnit ? 1 : g.s;
  const int64_t out_plane = g.Ho * g.Wo;
  // The u' that read window index u (ascending), with their x' ranges.
  int64_t u_lo, u_hi;
  axis_candidates(u, g.U, g.Uo, g.mode, &u_lo, &u_hi);
  int64_t n_u = 0;
  for (int64_t up = u_lo; up <= u_hi; ++up) {
    opmath_t w;
    if (!axis_weight<opmath_t>(up, u, g.U, g.Uo, g.mode, &w)) continue;
    UTerm<opmath_t>& t = uterms[n_u++];
    t.up = up;
    t.off = g.a * (up - g.Uo / 2);
    valid_range(t.off, s, g.W, g.Wo, &t.x_lo, &t.x_hi);
    t.w = w;
  }
  scalar_t* gx = grad_x + ((n * g.V + v) * g.U + u) * g.H * g.W;
  const scalar_t* go_n = grad_out + n * g.Vo * g.Uo * out_plane;
  for (int64_t Y = 0; Y < g.H; ++Y) {
    std::fill(acc, acc + g.W, opmath_t(0));
    int64_t v_first, v_last, v_step;
    axis_scan(v, Y, g.V, g.Vo, g, &v_first, &v_last, &v_step);
    for (int64_t vp = v_first; vp <= v_last; vp += v_step) {
      const int64_t yp = output_pos(Y, vp, g.Vo, g.Ho, g);
      opmath_t wv;
      if (yp < 0 || !axis_weight<opmath_t>(vp, v, g.V, g.Vo, g.mode, &wv)) continue;
      const scalar_t* go_row = go_n + vp * g.Uo * out_plane + yp * g.Wo;
      for (int64_t k = 0; k < n_u; ++k) {
        const UTerm<opmath_t>& t = uterms[k];
        const opmath_t w = wv * t.w;
        const scalar_t* src = go_row + t.up * out_plane;
        for (int64_t q = t.x_lo; q < t.x_hi; ++q) {
          const int64_t X = t.off + s * q;
          acc[X] = tm_fma(w, static_cast<opmath_t>(src[q]), acc[X]);
        }
      }
    }
    scalar_t* out_row = gx + Y * g.W;
    for (int64_t X = 0; X < g.W; ++X) out_row[X] = static_cast<scalar_t>(acc[X]);
  }
}

template <typename scalar_t>
using BackwardPlaneFn = void (*)(const scalar_t*, scalar_t*, const WindowGeometry&, int64_t,
                                 int64_t, int64_t, at::opmath_type<scalar_t>*,
                                 UTerm<at::opmath_type<scalar_t>>*);

template <typename scalar_t, bool kUnit>
TM_TARGET_AVX2_FMA void backward_plane_fma(
    const scalar_t* grad_out, scalar_t* grad_x, const WindowGeometry& g, int64_t n, int64_t v,
    int64_t u, at::opmath_type<scalar_t>* acc, UTerm<at::opmath_type<scalar_t>>* uterms) {
  backward_plane<scalar_t, kUnit>(grad_out, grad_x, g, n, v, u, acc, uterms);
}

template <typename scalar_t, bool kUnit>
void backward_plane_plain(
    const scalar_t* grad_out, scalar_t* grad_x, const WindowGeometry& g, int64_t n, int64_t v,
    int64_t u, at::opmath_type<scalar_t>* acc, UTerm<at::opmath_type<scalar_t>>* uterms) {
  backward_plane<scalar_t, kUnit>(grad_out, grad_x, g, n, v, u, acc, uterms);
}

template <typename scalar_t>
BackwardPlaneFn<scalar_t> pick_backward(const WindowGeometry& g) {
  if (use_fma_clone()) {
    return g.s == 1 ? &backward_plane_fma<scalar_t, true> : &backward_plane_fma<scalar_t, false>;
  }
  return g.s == 1 ? &backward_plane_plain<scalar_t, true> : &backward_plane_plain<scalar_t, false>;
}

// ---- elementwise (the CUDA kernels' per-thread functions; tests only) -------------------------

template <typename scalar_t>
void forward_elementwise(
    const scalar_t* x, scalar_t* out, const WindowGeometry& g, double pad_value) {
  const scalar_t pad = static_cast<scalar_t>(pad_value);
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, g.N * g.Vo * g.Uo * g.Ho * g.Wo, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t r = i;
      const int64_t xp = r % g.Wo;
      r /= g.Wo;
      const int64_t yp = r % g.Ho;
      r /= g.Ho;
      const int64_t up = r % g.Uo;
      r /= g.Uo;
      out[i] = g.sampling == kDetectron2Sampling
                   ? d2_forward_element<scalar_t, opmath_t>(
                         x, g, r / g.Vo, r % g.Vo, up, yp, xp, static_cast<opmath_t>(pad_value))
                   : forward_element<scalar_t, opmath_t>(x, g, r / g.Vo, r % g.Vo, up, yp, xp, pad);
    }
  });
}

template <typename scalar_t>
void backward_elementwise(const scalar_t* grad_out, scalar_t* grad_x, const WindowGeometry& g) {
  using opmath_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, g.N * g.V * g.U * g.H * g.W, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t r = i;
      const int64_t X = r % g.W;
      r /= g.W;
      const int64_t Y = r % g.H;
      r /= g.H;
      const int64_t u = r % g.U;
      r /= g.U;
      grad_x[i] = static_cast<scalar_t>(
          g.sampling == kDetectron2Sampling
              ? d2_backward_element<scalar_t, opmath_t>(grad_out, g, r / g.V, r % g.V, u, Y, X)
              : backward_element<scalar_t, opmath_t>(grad_out, g, r / g.V, r % g.V, u, Y, X));
    }
  });
}

// ---- the two generic ops ---------------------------------------------------------------------

at::Tensor window_forward_cpu(const at::Tensor& input, const WindowGeometry& g, double pad_value) {
  TORCH_CHECK(input.device().is_cpu(), "tensormask: expected a CPU tensor");
  const at::Tensor x = input.contiguous();
  at::Tensor out = cpu::empty_output({g.N, g.Vo, g.Uo, g.Ho, g.Wo}, x.options());
  if (out.numel() == 0) return out;
  if (use_elementwise()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "tensormask_window_forward_cpu", [&] {
          forward_elementwise(
              x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), g, pad_value);
        });
    return out;
  }
  if (g.sampling == kDetectron2Sampling) {
    cpu::detectron2_forward(x, out, g, pad_value);
    return out;
  }
  if (g.mode == kBilinear) {
    cpu::bilinear_forward(x, out, g, pad_value);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "tensormask_window_forward_cpu", [&] {
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        const scalar_t pad = static_cast<scalar_t>(pad_value);
        const CopySlabFn<scalar_t> slab = pick_copy<scalar_t>(g);
        at::parallel_for(0, g.N * g.Vo, 1, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) slab(xp, op, g, pad, i / g.Vo, i % g.Vo);
        });
      });
  return out;
}

at::Tensor window_backward_cpu(const at::Tensor& grad, const WindowGeometry& g) {
  TORCH_CHECK(grad.device().is_cpu(), "tensormask: expected a CPU tensor");
  if (g.mode == kIdentity && g.s == 1 && g.sampling == kPaperSampling && !use_elementwise()) {
    // Every input element is read by at most one output element, with weight 1: the gradient is
    // the opposite shift of grad, zero where nothing read it.
    WindowGeometry back = g;
    back.a = -g.a;
    return window_forward_cpu(grad, back, 0.0);
  }
  const at::Tensor go = grad.contiguous();
  at::Tensor gx = cpu::empty_output({g.N, g.V, g.U, g.H, g.W}, go.options());
  if (gx.numel() == 0) return gx;
  if (go.numel() == 0) return gx.zero_();
  if (use_elementwise()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, go.scalar_type(), "tensormask_window_backward_cpu", [&] {
          backward_elementwise(go.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), g);
        });
    return gx;
  }
  if (g.sampling == kDetectron2Sampling) {
    cpu::detectron2_backward(go, gx, g);
    return gx;
  }
  if (g.mode == kBilinear) {
    cpu::bilinear_backward(go, gx, g);
    return gx;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, go.scalar_type(), "tensormask_window_backward_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const scalar_t* gop = go.const_data_ptr<scalar_t>();
        scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
        const BackwardPlaneFn<scalar_t> plane = pick_backward<scalar_t>(g);
        at::parallel_for(0, g.N * g.V * g.U, 1, [&](int64_t begin, int64_t end) {
          std::vector<opmath_t> acc(g.W);
          std::vector<UTerm<opmath_t>> uterms(g.Uo);
          for (int64_t i = begin; i < end; ++i) {
            const int64_t u = i % g.U;
            const int64_t v = (i / g.U) % g.V;
            const int64_t n = i / (g.U * g.V);
            plane(gop, gxp, g, n, v, u, acc.data(), uterms.data());
          }
        });
      });
  return gx;
}

using CpuOps = WindowOps<&window_forward_cpu, &window_backward_cpu>;

}  // namespace
}  // namespace tensormask

TORCH_LIBRARY_IMPL(tensormask, CPU, m) {
  TENSORMASK_IMPL_WINDOW_OPS(m, tensormask::CpuOps);
}

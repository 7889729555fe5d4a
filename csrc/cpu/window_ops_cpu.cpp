// CPU kernels of the TensorMask window ops: one generic forward and one generic backward (see
// csrc/window_math.h for the computation they share with the CUDA kernels).
//
// Forward: parallel over (n, v') slabs of the output; then u', then y', then a contiguous x' loop
// whose in-bounds range is computed once per row (pad outside it). The per-(v', u') taps and
// weights are hoisted out of the row loops; identity resizes (align2nat, nat2align, lam = 1) are a
// shifted copy.
// Backward: a gather, parallel over (n, v, u) planes of grad_x; each row of grad_x accumulates
// the rows of grad_out that read it, in the same order as the CUDA kernel's per-element loop
// (v' ascending, then u' ascending), so the result is deterministic and equal to the CUDA one.
//
// FMA: every multiply-add is an explicit fma (matching ATen's bits). On x86-64 the hot loops are
// compiled twice, once for the baseline ISA (fma is a libm call) and once with
// __attribute__((target("avx2,fma"))) (one instruction, vectorisable), and the AVX2+FMA clone is
// picked at run time when the CPU has it. Both give identical results (fma is exactly rounded).
// TENSORMASK_CPU_FMA=0 forces the baseline clone (used by the tests).
//
// TENSORMASK_CPU_KERNEL=elementwise (for the tests) replaces the row loops with one call per
// element of forward_element() / backward_element(), the very functions the CUDA kernels run per
// thread: it checks the CUDA kernels' arithmetic on a machine without a GPU.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "window_ops.h"

namespace tensormask {
namespace {

#if defined(__GNUC__) && defined(__x86_64__)
#define TM_HAVE_FMA_CLONE 1
#define TM_TARGET_AVX2_FMA __attribute__((target("avx2,fma")))
#else
#define TM_HAVE_FMA_CLONE 0
#define TM_TARGET_AVX2_FMA
#endif

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

// Output positions q in [0, out_len) whose input position s*q + off lies in [0, in_len): [lo, hi).
inline void valid_range(int64_t off, int64_t s, int64_t in_len, int64_t out_len, int64_t* lo,
                        int64_t* hi) {
  int64_t l = floor_div(-off + s - 1, s);  // ceil(-off / s)
  int64_t h = floor_div(in_len - 1 - off, s) + 1;
  l = std::max<int64_t>(l, 0);
  h = std::min<int64_t>(h, out_len);
  *lo = l;
  *hi = std::max(h, l);
}

template <typename scalar_t>
inline void fill(scalar_t* p, int64_t n, scalar_t value) {
  std::fill(p, p + std::max<int64_t>(n, 0), value);
}

enum ForwardKind : int { kCopy = 0, kSepar = 1, kFour = 2 };

// ---- forward: one (n, v') slab of the output ------------------------------------------------

template <typename scalar_t, int kKind, bool kUnit>
C10_ALWAYS_INLINE void forward_slab(
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
    // Planes x[n, i_v, i_u] (offsets from xn); for kCopy only the first is read.
    const scalar_t* p00 = xn + (tv.i0 * g.U + tu.i0) * HW;
    const scalar_t* p01 = xn + (tv.i0 * g.U + tu.i1) * HW;
    const scalar_t* p10 = xn + (tv.i1 * g.U + tu.i0) * HW;
    const scalar_t* p11 = xn + (tv.i1 * g.U + tu.i1) * HW;
    const opmath_t lv0 = tv.l0, lv1 = tv.l1, lu0 = tu.l0, lu1 = tu.l1;
    const opmath_t w00 = lv0 * lu0, w01 = lv0 * lu1, w10 = lv1 * lu0, w11 = lv1 * lu1;

    for (int64_t yp = y_lo; yp < y_hi; ++yp) {
      scalar_t* row = o + yp * g.Wo;
      fill(row, x_lo, pad);
      fill(row + x_hi, g.Wo - x_hi, pad);
      // Offset of (Y, X) within a plane, minus s*x' (only x' in [x_lo, x_hi) are read).
      const int64_t base = (s * yp + off_v) * g.W + off_u;
      if (kKind == kCopy) {
        if (kUnit) {
          std::memcpy(row + x_lo, p00 + base + x_lo, sizeof(scalar_t) * (x_hi - x_lo));
        } else {
          for (int64_t q = x_lo; q < x_hi; ++q) row[q] = p00[base + s * q];
        }
      } else {
        for (int64_t q = x_lo; q < x_hi; ++q) {
          const int64_t i = base + s * q;
          const opmath_t x00 = static_cast<opmath_t>(p00[i]);
          const opmath_t x01 = static_cast<opmath_t>(p01[i]);
          const opmath_t x10 = static_cast<opmath_t>(p10[i]);
          const opmath_t x11 = static_cast<opmath_t>(p11[i]);
          opmath_t val;
          if (kKind == kFour) {
            val = bilinear_four_weight(x00, x01, x10, x11, w00, w01, w10, w11);
          } else {
            val = bilinear_separable(x00, x01, x10, x11, lv0, lv1, lu0, lu1);
          }
          row[q] = static_cast<scalar_t>(val);
        }
      }
    }
  }
}

template <typename scalar_t>
using ForwardSlabFn = void (*)(const scalar_t*, scalar_t*, const WindowGeometry&, scalar_t,
                               int64_t, int64_t);

template <typename scalar_t, int kKind, bool kUnit>
TM_TARGET_AVX2_FMA void forward_slab_fma(
    const scalar_t* x, scalar_t* out, const WindowGeometry& g, scalar_t pad, int64_t n,
    int64_t vp) {
  forward_slab<scalar_t, kKind, kUnit>(x, out, g, pad, n, vp);
}

template <typename scalar_t, int kKind, bool kUnit>
void forward_slab_plain(
    const scalar_t* x, scalar_t* out, const WindowGeometry& g, scalar_t pad, int64_t n,
    int64_t vp) {
  forward_slab<scalar_t, kKind, kUnit>(x, out, g, pad, n, vp);
}

template <typename scalar_t, int kKind, bool kUnit>
ForwardSlabFn<scalar_t> pick_forward_unit() {
  return use_fma_clone() ? &forward_slab_fma<scalar_t, kKind, kUnit>
                         : &forward_slab_plain<scalar_t, kKind, kUnit>;
}

template <typename scalar_t, int kKind>
ForwardSlabFn<scalar_t> pick_forward_kind(const WindowGeometry& g) {
  return g.s == 1 ? pick_forward_unit<scalar_t, kKind, true>()
                  : pick_forward_unit<scalar_t, kKind, false>();
}

template <typename scalar_t>
ForwardSlabFn<scalar_t> pick_forward(const WindowGeometry& g) {
  if (g.mode != kBilinear) return pick_forward_kind<scalar_t, kCopy>(g);  // identity, nearest
  if (g.order == kFourWeight) return pick_forward_kind<scalar_t, kFour>(g);
  return pick_forward_kind<scalar_t, kSepar>(g);
}

// ---- backward: one (n, v, u) plane of grad_x ------------------------------------------------

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

// ---- swap_align2nat_detectron2 (window_math.h: d2_forward_element, d2_backward_element) --------

// One term of a d2 output element: weight, row tap, column tap, and the (v*, u*) plane (nullptr
// when v* or u* is outside the window grid: the tap reads pad_value).
template <typename scalar_t, typename opmath_t>
struct D2Term {
  opmath_t w;
  int iy, ix;
  const scalar_t* plane;
};

// Forward, one (n, v') slab. Per (u', y') row: the columns x' whose two column taps are inside
// [0, W) add the 16 terms (fewer: zero weights are skipped) term by term over the whole row, in
// the order of d2_forward_element, into an opmath row buffer; the columns at the rim call
// d2_forward_element itself.
template <typename scalar_t, bool kUnit>
C10_ALWAYS_INLINE void d2_forward_slab(
    const scalar_t* x, scalar_t* out, const WindowGeometry& g, at::opmath_type<scalar_t> pad,
    int64_t n, int64_t vp, at::opmath_type<scalar_t>* acc) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t lam = kUnit ? 1 : g.s;
  const int64_t HW = g.H * g.W;
  const int64_t out_plane = g.Ho * g.Wo;
  const D2Tap<opmath_t> tv = d2_window_tap<opmath_t>(vp, lam);
  const int64_t vi[2] = {tv.f, tv.c};
  const opmath_t wv[2] = {tv.wf, tv.wc};
  const int64_t off_v = vp - g.Vo / 2;  // Y0 = lam*y' + off_v
  const int64_t ex = g.Uo % 2 == 0 ? 1 : 0;  // a second column tap
  const scalar_t* xn = x + n * g.V * g.U * HW;
  scalar_t* slab = out + (n * g.Vo + vp) * g.Uo * out_plane;
  D2Term<scalar_t, opmath_t> terms[16];

  for (int64_t up = 0; up < g.Uo; ++up) {
    const D2Tap<opmath_t> tu = d2_window_tap<opmath_t>(up, lam);
    const int64_t ui[2] = {tu.f, tu.c};
    const opmath_t wu[2] = {tu.wf, tu.wc};
    const int64_t off_u = up - g.Uo / 2;  // X0 = lam*x' + off_u
    int64_t x_lo, x_hi;  // X0 and X0 + ex inside [0, W)
    valid_range(off_u, lam, g.W - ex, g.Wo, &x_lo, &x_hi);
    int n_terms = 0;
    for (int iy = 0; iy < 2; ++iy) {
      for (int ix = 0; ix < 2; ++ix) {
        const opmath_t wyx = tm_mul(
            d2_spatial_weight<opmath_t>(g.Vo, iy), d2_spatial_weight<opmath_t>(g.Uo, ix));
        for (int iv = 0; iv < 2; ++iv) {
          const opmath_t wyxv = tm_mul(wyx, wv[iv]);
          for (int iu = 0; iu < 2; ++iu) {
            const opmath_t w = tm_mul(wyxv, wu[iu]);
            if (w == opmath_t(0)) continue;
            const bool in = vi[iv] >= 0 && vi[iv] < g.V && ui[iu] >= 0 && ui[iu] < g.U;
            terms[n_terms++] = {w, iy, ix, in ? xn + (vi[iv] * g.U + ui[iu]) * HW : nullptr};
          }
        }
      }
    }
    for (int64_t yp = 0; yp < g.Ho; ++yp) {
      scalar_t* row = slab + up * out_plane + yp * g.Wo;
      const int64_t rim_lo = std::min(x_lo, g.Wo);  // [0, rim_lo) and [x_hi, Wo): the rim
      for (int64_t q = 0; q < rim_lo; ++q) {
        row[q] = d2_forward_element<scalar_t, opmath_t>(x, g, n, vp, up, yp, q, pad);
      }
      for (int64_t q = std::max(x_hi, rim_lo); q < g.Wo; ++q) {
        row[q] = d2_forward_element<scalar_t, opmath_t>(x, g, n, vp, up, yp, q, pad);
      }
      if (x_lo >= x_hi) continue;
      std::fill(acc + x_lo, acc + x_hi, opmath_t(0));
      const int64_t Y0 = lam * yp + off_v;
      for (int k = 0; k < n_terms; ++k) {
        const D2Term<scalar_t, opmath_t>& t = terms[k];
        const int64_t Y = Y0 + t.iy;
        if (t.plane == nullptr || Y < 0 || Y >= g.H) {
          const opmath_t c = tm_mul(t.w, pad);
          for (int64_t q = x_lo; q < x_hi; ++q) acc[q] = tm_add(acc[q], c);
          continue;
        }
        const scalar_t* src = t.plane + Y * g.W + off_u + t.ix;
        const opmath_t w = t.w;
        for (int64_t q = x_lo; q < x_hi; ++q) {
          acc[q] = tm_add(acc[q], tm_mul(w, static_cast<opmath_t>(src[lam * q])));
        }
      }
      for (int64_t q = x_lo; q < x_hi; ++q) row[q] = static_cast<scalar_t>(acc[q]);
    }
  }
}

template <typename scalar_t>
using D2ForwardSlabFn = void (*)(const scalar_t*, scalar_t*, const WindowGeometry&,
                                 at::opmath_type<scalar_t>, int64_t, int64_t,
                                 at::opmath_type<scalar_t>*);

template <typename scalar_t, bool kUnit>
TM_TARGET_AVX2_FMA void d2_forward_slab_fma(
    const scalar_t* x, scalar_t* out, const WindowGeometry& g, at::opmath_type<scalar_t> pad,
    int64_t n, int64_t vp, at::opmath_type<scalar_t>* acc) {
  d2_forward_slab<scalar_t, kUnit>(x, out, g, pad, n, vp, acc);
}

template <typename scalar_t, bool kUnit>
void d2_forward_slab_plain(
    const scalar_t* x, scalar_t* out, const WindowGeometry& g, at::opmath_type<scalar_t> pad,
    int64_t n, int64_t vp, at::opmath_type<scalar_t>* acc) {
  d2_forward_slab<scalar_t, kUnit>(x, out, g, pad, n, vp, acc);
}

template <typename scalar_t>
D2ForwardSlabFn<scalar_t> pick_d2_forward(const WindowGeometry& g) {
  if (use_fma_clone()) {
    return g.s == 1 ? &d2_forward_slab_fma<scalar_t, true> : &d2_forward_slab_fma<scalar_t, false>;
  }
  return g.s == 1 ? &d2_forward_slab_plain<scalar_t, true>
                  : &d2_forward_slab_plain<scalar_t, false>;
}

// A window index d' that reads input index d, with its total weight.
template <typename opmath_t>
struct D2WindowTerm {
  int64_t dp;
  opmath_t w;
};

// The d' (ascending) that read window index d: at most the candidate range's 3*lam + 3.
template <typename opmath_t>
int64_t d2_window_terms(int64_t d, int64_t lam, int64_t out, D2WindowTerm<opmath_t>* terms) {
  int64_t lo, hi;
  d2_window_candidates(d, lam, out, &lo, &hi);
  int64_t n = 0;
  for (int64_t dp = lo; dp <= hi; ++dp) {
    opmath_t w;
    if (d2_window_weight<opmath_t>(dp, d, lam, &w)) terms[n++] = {dp, w};
  }
  return n;
}

// Backward, one (n, v, u) plane of grad_x: each row accumulates, in the order of
// d2_backward_element (row tap, v' ascending, column tap, u' ascending), the grad_out rows that
// read it.
template <typename scalar_t, bool kUnit>
C10_ALWAYS_INLINE void d2_backward_plane(
    const scalar_t* grad_out, scalar_t* grad_x, const WindowGeometry& g, int64_t n, int64_t v,
    int64_t u, at::opmath_type<scalar_t>* acc, D2WindowTerm<at::opmath_type<scalar_t>>* vterms,
    D2WindowTerm<at::opmath_type<scalar_t>>* uterms) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t lam = kUnit ? 1 : g.s;
  const int64_t out_plane = g.Ho * g.Wo;
  const int ny = g.Vo % 2 == 0 ? 2 : 1;
  const int nx = g.Uo % 2 == 0 ? 2 : 1;
  const opmath_t syx =
      tm_mul(d2_spatial_weight<opmath_t>(g.Vo, 0), d2_spatial_weight<opmath_t>(g.Uo, 0));
  const int64_t n_v = d2_window_terms<opmath_t>(v, lam, g.Vo, vterms);
  const int64_t n_u = d2_window_terms<opmath_t>(u, lam, g.Uo, uterms);
  scalar_t* gx = grad_x + ((n * g.V + v) * g.U + u) * g.H * g.W;
  const scalar_t* go_n = grad_out + n * g.Vo * g.Uo * out_plane;
  for (int64_t Y = 0; Y < g.H; ++Y) {
    std::fill(acc, acc + g.W, opmath_t(0));
    for (int iy = 0; iy < ny; ++iy) {
      const int64_t rv = Y - iy + g.Vo / 2;  // = lam*y' + v'
      for (int64_t kv = 0; kv < n_v; ++kv) {
        const int64_t vp = vterms[kv].dp;
        if (!kUnit && pos_mod(rv - vp, lam) != 0) continue;
        const int64_t yp = (rv - vp) / lam;
        if (yp < 0 || yp >= g.Ho) continue;
        const opmath_t wyxv = tm_mul(syx, vterms[kv].w);
        const scalar_t* go_row = go_n + vp * g.Uo * out_plane + yp * g.Wo;
        for (int ix = 0; ix < nx; ++ix) {
          for (int64_t ku = 0; ku < n_u; ++ku) {
            const int64_t up = uterms[ku].dp;
            const opmath_t w = tm_mul(wyxv, uterms[ku].w);
            const int64_t off = up - g.Uo / 2 + ix;  // X = lam*x' + off
            int64_t lo, hi;
            valid_range(off, lam, g.W, g.Wo, &lo, &hi);
            const scalar_t* src = go_row + up * out_plane;
            for (int64_t q = lo; q < hi; ++q) {
              const int64_t X = off + lam * q;
              acc[X] = tm_fma(w, static_cast<opmath_t>(src[q]), acc[X]);
            }
          }
        }
      }
    }
    scalar_t* out_row = gx + Y * g.W;
    for (int64_t X = 0; X < g.W; ++X) out_row[X] = static_cast<scalar_t>(acc[X]);
  }
}

template <typename scalar_t>
using D2BackwardPlaneFn = void (*)(const scalar_t*, scalar_t*, const WindowGeometry&, int64_t,
                                   int64_t, int64_t, at::opmath_type<scalar_t>*,
                                   D2WindowTerm<at::opmath_type<scalar_t>>*,
                                   D2WindowTerm<at::opmath_type<scalar_t>>*);

template <typename scalar_t, bool kUnit>
TM_TARGET_AVX2_FMA void d2_backward_plane_fma(
    const scalar_t* grad_out, scalar_t* grad_x, const WindowGeometry& g, int64_t n, int64_t v,
    int64_t u, at::opmath_type<scalar_t>* acc, D2WindowTerm<at::opmath_type<scalar_t>>* vterms,
    D2WindowTerm<at::opmath_type<scalar_t>>* uterms) {
  d2_backward_plane<scalar_t, kUnit>(grad_out, grad_x, g, n, v, u, acc, vterms, uterms);
}

template <typename scalar_t, bool kUnit>
void d2_backward_plane_plain(
    const scalar_t* grad_out, scalar_t* grad_x, const WindowGeometry& g, int64_t n, int64_t v,
    int64_t u, at::opmath_type<scalar_t>* acc, D2WindowTerm<at::opmath_type<scalar_t>>* vterms,
    D2WindowTerm<at::opmath_type<scalar_t>>* uterms) {
  d2_backward_plane<scalar_t, kUnit>(grad_out, grad_x, g, n, v, u, acc, vterms, uterms);
}

template <typename scalar_t>
D2BackwardPlaneFn<scalar_t> pick_d2_backward(const WindowGeometry& g) {
  if (use_fma_clone()) {
    return g.s == 1 ? &d2_backward_plane_fma<scalar_t, true>
                    : &d2_backward_plane_fma<scalar_t, false>;
  }
  return g.s == 1 ? &d2_backward_plane_plain<scalar_t, true>
                  : &d2_backward_plane_plain<scalar_t, false>;
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
  at::Tensor out = at::empty({g.N, g.Vo, g.Uo, g.Ho, g.Wo}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "tensormask_window_forward_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        if (use_elementwise()) {
          forward_elementwise(xp, op, g, pad_value);
          return;
        }
        if (g.sampling == kDetectron2Sampling) {
          // The pad value enters the weighted sum: converted to opmath directly.
          const opmath_t pad = static_cast<opmath_t>(pad_value);
          const D2ForwardSlabFn<scalar_t> slab = pick_d2_forward<scalar_t>(g);
          at::parallel_for(0, g.N * g.Vo, 1, [&](int64_t begin, int64_t end) {
            std::vector<opmath_t> acc(g.Wo);
            for (int64_t i = begin; i < end; ++i) {
              slab(xp, op, g, pad, i / g.Vo, i % g.Vo, acc.data());
            }
          });
          return;
        }
        const scalar_t pad = static_cast<scalar_t>(pad_value);
        const ForwardSlabFn<scalar_t> slab = pick_forward<scalar_t>(g);
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
  at::Tensor gx = at::empty({g.N, g.V, g.U, g.H, g.W}, go.options());
  if (gx.numel() == 0) return gx;
  if (go.numel() == 0) return gx.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, go.scalar_type(), "tensormask_window_backward_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const scalar_t* gop = go.const_data_ptr<scalar_t>();
        scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
        if (use_elementwise()) {
          backward_elementwise(gop, gxp, g);
          return;
        }
        if (g.sampling == kDetectron2Sampling) {
          const D2BackwardPlaneFn<scalar_t> plane = pick_d2_backward<scalar_t>(g);
          at::parallel_for(0, g.N * g.V * g.U, 1, [&](int64_t begin, int64_t end) {
            std::vector<opmath_t> acc(g.W);
            std::vector<D2WindowTerm<opmath_t>> vterms(3 * g.s + 4), uterms(3 * g.s + 4);
            for (int64_t i = begin; i < end; ++i) {
              const int64_t u = i % g.U;
              const int64_t v = (i / g.U) % g.V;
              const int64_t n = i / (g.U * g.V);
              plane(gop, gxp, g, n, v, u, acc.data(), vterms.data(), uterms.data());
            }
          });
          return;
        }
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

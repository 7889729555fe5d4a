// swap_align2nat_detectron2 on the CPU (window_math.h has the per-element math,
// d2_forward_element and d2_backward_element; these kernels add the same terms, in the same
// order, a row at a time).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"

namespace tensormask {
namespace cpu {
namespace {

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

}  // namespace

void detectron2_forward(const at::Tensor& x, at::Tensor& out, const WindowGeometry& g, double pad) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "tensormask_detectron2_forward_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        // The pad value enters the weighted sum: converted to opmath directly.
        const opmath_t pad_o = static_cast<opmath_t>(pad);
        const D2ForwardSlabFn<scalar_t> slab = pick_d2_forward<scalar_t>(g);
        at::parallel_for(0, g.N * g.Vo, 1, [&](int64_t begin, int64_t end) {
          std::vector<opmath_t> acc(g.Wo);
          for (int64_t i = begin; i < end; ++i) {
            slab(xp, op, g, pad_o, i / g.Vo, i % g.Vo, acc.data());
          }
        });
      });
}

void detectron2_backward(const at::Tensor& grad, at::Tensor& grad_x, const WindowGeometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "tensormask_detectron2_backward_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const scalar_t* gop = grad.const_data_ptr<scalar_t>();
        scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
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
      });
}

}  // namespace cpu
}  // namespace tensormask

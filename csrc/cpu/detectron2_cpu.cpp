// swap_align2nat_detectron2 on the CPU (window_math.h has the per-element math,
// d2_forward_element and d2_backward_element; these kernels add the same terms, in the same
// order, a row at a time).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"

namespace tensormask {
namespace cpu {
namespace {

// Prefetch distances (bilinear_cpu.cpp says why): input rows, and output rows a plane apart.
constexpr int64_t kD2PrefetchRows = 6;
constexpr int64_t kD2PrefetchPlanes = 4;

// D2Plan::uoff of a window tap outside the grid (offsets can be negative when read in place).
constexpr int64_t kOutside = std::numeric_limits<int64_t>::min();

// ---- forward -------------------------------------------------------------------------------
//
// Like the paper op's (bilinear_cpu.cpp), per input row: output row (n, v', u', y') reads input
// rows Y0 = lam*y' + v' - Vo//2 and Y0 + 1 (the second only when Vo is even) of the planes
// (v*, u*) of its window taps, so the tasks run over (n, Y0), and for each Y0 the V*U input rows
// at Y0 and Y0 + 1 are staged (split by column phase when lam > 1, converted to opmath, with
// pad_value in the columns outside [0, W) that output columns read; float input with lam = 1 is
// read in place), each row once per task chunk. Every output row of this Y0 (the v' with
// v' = Y0 + Vo//2 mod lam, each with every u') then adds its terms, in the order of
// d2_forward_element (row tap, column tap, v tap, u tap; zero weights skipped), each term over
// the whole row: unit-stride loops, vectorised. Taps outside the input (a row outside [0, H), a
// window index outside the grid, a staged pad column) add w * pad_value, as d2_forward_element
// does. Read in place, the columns at the rim, where one column tap is outside [0, W), call
// d2_forward_element itself.

// The columns of output window index u': X = lam*x' + off + ix for x' in [lo, hi) (all x' when
// staged; else those with both column taps inside [0, W)), found at k = x' + start[ix] of phase
// row r[ix].
struct D2Columns {
  int64_t lo, hi;
  int64_t start[2], r[2];
};

template <typename scalar_t>
struct D2Plan {
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr bool kSameType = std::is_same<scalar_t, opmath_t>::value;

  WindowGeometry g;
  int64_t lam;
  int ny, nx;  // row / column taps: 2 when Vo / Uo is even, else 1
  opmath_t wyx[2][2];  // tm_mul(d2_spatial_weight(Vo, iy), d2_spatial_weight(Uo, ix))
  std::vector<D2Tap<opmath_t>> v, u;  // (Vo,), (Uo,)
  std::vector<D2Columns> cols;  // (Uo,)
  // (Uo, 2, 2): offset of column tap ix of window tap iu of u' from the row of plane (v*, 0)
  // (u* * vu_stride + r * r_stride + start); kOutside when u* is outside the grid.
  std::vector<int64_t> uoff;
  bool staged;
  // Staged rows: phase row r holds X = lam*(k - k_pad) + r at k, for k in [0, K) (pad_value
  // outside [0, W)); read in place: K = W, k_pad = 0.
  int64_t K, k_pad;
  int64_t plane;  // buffer elements per (v, u): lam * K
  int64_t y_first, n_rows;  // Y0 in [y_first, y_first + n_rows) per n

  explicit D2Plan(const WindowGeometry& geometry) : g(geometry), lam(geometry.s) {
    ny = g.Vo % 2 == 0 ? 2 : 1;
    nx = g.Uo % 2 == 0 ? 2 : 1;
    for (int iy = 0; iy < 2; ++iy) {
      for (int ix = 0; ix < 2; ++ix) {
        wyx[iy][ix] = tm_mul(
            d2_spatial_weight<opmath_t>(g.Vo, iy), d2_spatial_weight<opmath_t>(g.Uo, ix));
      }
    }
    v.resize(g.Vo);
    for (int64_t vp = 0; vp < g.Vo; ++vp) v[vp] = d2_window_tap<opmath_t>(vp, lam);
    staged = lam > 1 || !kSameType;
    // Columns read: X in [-(Uo/2), lam*(Wo - 1) + Uo - Uo/2 + 1).
    k_pad = staged ? (g.Uo / 2 + lam - 1) / lam : 0;
    const int64_t x_end = std::max(g.W, lam * (g.Wo - 1) + g.Uo - g.Uo / 2 + 1);
    K = staged ? k_pad + (x_end + lam - 1) / lam : g.W;
    plane = lam * K;
    u.resize(g.Uo);
    cols.resize(g.Uo);
    for (int64_t up = 0; up < g.Uo; ++up) {
      u[up] = d2_window_tap<opmath_t>(up, lam);
      const int64_t off = up - g.Uo / 2;
      D2Columns& c = cols[up];
      if (staged) {
        c.lo = 0;
        c.hi = g.Wo;
      } else {
        valid_range(off, lam, g.W - (nx - 1), g.Wo, &c.lo, &c.hi);
      }
      for (int ix = 0; ix < 2; ++ix) {
        c.r[ix] = pos_mod(off + ix, lam);
        c.start[ix] = floor_div(off + ix, lam) + k_pad;
      }
    }
    const int64_t vu_stride = staged ? plane : g.H * g.W;
    const int64_t r_stride = staged ? K : 0;
    uoff.resize(4 * g.Uo);
    for (int64_t up = 0; up < g.Uo; ++up) {
      const int64_t ui[2] = {u[up].f, u[up].c};
      for (int ix = 0; ix < 2; ++ix) {
        for (int iu = 0; iu < 2; ++iu) {
          const bool in = ui[iu] >= 0 && ui[iu] < g.U;
          uoff[4 * up + 2 * ix + iu] =
              in ? ui[iu] * vu_stride + cols[up].r[ix] * r_stride + cols[up].start[ix] : kOutside;
        }
      }
    }
    y_first = -(g.Vo / 2);
    n_rows = lam * (g.Ho - 1) + g.Vo;
  }
};

// One term of an output row: its weight, and the row it reads.
template <typename opmath_t>
struct D2RowTerm {
  opmath_t w;
  const opmath_t* src;  // src[q] for x' = q (a row of pad_value for a tap outside the input)
};

// Columns summed at once, in registers.
constexpr int kD2Block = 8;

// o[q] for q in [lo, hi): the sum of the terms' w * src[q], added in order from +0. kN: the
// number of terms as a compile-time constant (16: every weight nonzero), 0 for n_terms. With
// `overread`, the last partial block reads (and drops) up to kD2Block - 1 values past hi.
template <int kN, typename scalar_t, typename opmath_t>
C10_ALWAYS_INLINE void d2_row_sum(
    const D2RowTerm<opmath_t>* terms, int n_terms, scalar_t* o, int64_t lo, int64_t hi,
    bool overread) {
  const int n = kN > 0 ? kN : n_terms;
  int64_t q = lo;
  const int64_t full_end = overread ? hi : hi - kD2Block + 1;
  for (; q < full_end; q += kD2Block) {
    opmath_t a[kD2Block] = {};
    for (int k = 0; k < n; ++k) {
      const opmath_t w = terms[k].w;
      const opmath_t* __restrict src = terms[k].src + q;
      for (int j = 0; j < kD2Block; ++j) a[j] = tm_add(a[j], tm_mul(w, src[j]));
    }
    const int m = static_cast<int>(std::min<int64_t>(kD2Block, hi - q));
    if (m == kD2Block) {
      for (int j = 0; j < kD2Block; ++j) o[q + j] = static_cast<scalar_t>(a[j]);
    } else {
      for (int j = 0; j < m; ++j) o[q + j] = static_cast<scalar_t>(a[j]);
    }
  }
  if (q < hi) {
    const int m = static_cast<int>(hi - q);
    opmath_t a[kD2Block] = {};
    for (int k = 0; k < n; ++k) {
      const opmath_t w = terms[k].w;
      const opmath_t* __restrict src = terms[k].src + q;
      for (int j = 0; j < m; ++j) a[j] = tm_add(a[j], tm_mul(w, src[j]));
    }
    for (int j = 0; j < m; ++j) o[q + j] = static_cast<scalar_t>(a[j]);
  }
}

// Output rows of (n, Y0) for i in [begin, end), i = n*n_rows + (Y0 - y_first). buf: two staged
// rows (V*U*plane each, then kD2Block spare values; filled with pad_value by the caller).
// pad_row: Wo + kD2Block values of pad_value, what a tap outside the input reads.
template <typename scalar_t>
C10_ALWAYS_INLINE void d2_forward_rows(
    const D2Plan<scalar_t>& plan, const scalar_t* x, scalar_t* out, at::opmath_type<scalar_t> pad,
    int64_t begin, int64_t end, at::opmath_type<scalar_t>* buf, const at::opmath_type<scalar_t>* pad_row) {
  using opmath_t = at::opmath_type<scalar_t>;
  const WindowGeometry& g = plan.g;
  const int64_t lam = plan.lam;
  const int64_t HW = g.H * g.W, VU = g.V * g.U, out_plane = g.Ho * g.Wo;
  const int64_t buf_rows = VU * plan.plane;
  int64_t held[2] = {-1, -1};  // the input row i' = n*H + Y each half of buf holds
  const int64_t vu_stride = plan.staged ? plan.plane : HW;
  D2RowTerm<opmath_t> terms[16];

  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = i / plan.n_rows;
    const int64_t Y0 = plan.y_first + i % plan.n_rows;
    // The two input rows: opmath rows of (v*, u*, phase r) at base[iy] + (v*U + u*)*vu_stride +
    // r*r_stride, or nullptr outside [0, H).
    const opmath_t* base[2] = {nullptr, nullptr};
    for (int iy = 0; iy < plan.ny; ++iy) {
      const int64_t Y = Y0 + iy;
      if (Y < 0 || Y >= g.H) continue;
      const scalar_t* rows = x + (n * VU * g.H + Y) * g.W;  // row Y of plane (n, 0, 0)
      if constexpr (D2Plan<scalar_t>::kSameType) {
        if (!plan.staged) {
          base[iy] = rows;
          continue;
        }
      }
      const int64_t key = n * g.H + Y;
      int slot = held[0] == key ? 0 : held[1] == key ? 1 : -1;
      if (slot < 0) {
        // Not over the row of this Y0's other tap (the next Y0's first row is this one's second).
        const int64_t other = iy == 0 ? key + 1 : key - 1;
        slot = held[0] == other ? 1 : 0;
        opmath_t* dst0 = buf + slot * buf_rows;
        for (int64_t vu = 0; vu < VU; ++vu) {
          const scalar_t* src = rows + vu * HW;
          if (vu + kD2PrefetchRows < VU) prefetch_row(src + kD2PrefetchRows * HW, g.W);
          // Only the columns in [0, W): the others hold pad_value since buf was made.
          stage_row(src, dst0 + vu * plan.plane + plan.k_pad, lam, plan.K, g.W);
        }
        held[slot] = key;
      }
      base[iy] = buf + slot * buf_rows;
    }

    for (int64_t vp = pos_mod(Y0 + g.Vo / 2, lam); vp < g.Vo; vp += lam) {
      const int64_t yp = floor_div(Y0 - vp + g.Vo / 2, lam);  // exact: lam divides it
      if (yp < 0 || yp >= g.Ho) continue;
      const D2Tap<opmath_t>& tv = plan.v[vp];
      const int64_t vi[2] = {tv.f, tv.c};
      const opmath_t* vrow[2][2];  // [iy][iv]: the rows of plane (v*, 0), nullptr: pad_value
      for (int iy = 0; iy < 2; ++iy) {
        for (int iv = 0; iv < 2; ++iv) {
          const bool in = base[iy] != nullptr && vi[iv] >= 0 && vi[iv] < g.V;
          vrow[iy][iv] = in ? base[iy] + vi[iv] * g.U * vu_stride : nullptr;
        }
      }
      opmath_t wyxv[2][2][2];  // [iy][ix][iv]
      for (int iy = 0; iy < 2; ++iy) {
        for (int ix = 0; ix < 2; ++ix) {
          wyxv[iy][ix][0] = tm_mul(plan.wyx[iy][ix], tv.wf);
          wyxv[iy][ix][1] = tm_mul(plan.wyx[iy][ix], tv.wc);
        }
      }
      scalar_t* o = out + (n * g.Vo + vp) * g.Uo * out_plane + yp * g.Wo;
      for (int64_t up = 0; up < g.Uo; ++up, o += out_plane) {
        if (up + kD2PrefetchPlanes < g.Uo) prefetch_row_w(o + kD2PrefetchPlanes * out_plane, g.Wo);
        const D2Columns& c = plan.cols[up];
        const int64_t lo = std::min(c.lo, g.Wo), hi = std::max(c.hi, lo);
        for (int64_t q = 0; q < lo; ++q) {
          o[q] = d2_forward_element<scalar_t, opmath_t>(x, g, n, vp, up, yp, q, pad);
        }
        for (int64_t q = hi; q < g.Wo; ++q) {
          o[q] = d2_forward_element<scalar_t, opmath_t>(x, g, n, vp, up, yp, q, pad);
        }
        if (lo >= hi) continue;
        const D2Tap<opmath_t>& tu = plan.u[up];
        const opmath_t wu[2] = {tu.wf, tu.wc};
        const int64_t* uoff = plan.uoff.data() + 4 * up;  // [ix][iu]
        int n_terms = 0;
        for (int iy = 0; iy < 2; ++iy) {
          for (int ix = 0; ix < 2; ++ix) {
            for (int iv = 0; iv < 2; ++iv) {
              for (int iu = 0; iu < 2; ++iu) {
                const opmath_t w = tm_mul(wyxv[iy][ix][iv], wu[iu]);
                if (w == opmath_t(0)) continue;
                const int64_t off = uoff[2 * ix + iu];
                const bool in = vrow[iy][iv] != nullptr && off != kOutside;
                terms[n_terms++] = {w, in ? vrow[iy][iv] + off : pad_row};
              }
            }
          }
        }
        if (n_terms == 16) {
          d2_row_sum<16>(terms, n_terms, o, lo, hi, plan.staged);
        } else {
          d2_row_sum<0>(terms, n_terms, o, lo, hi, plan.staged);
        }
      }
    }
  }
}

template <typename scalar_t>
using D2ForwardRowsFn = void (*)(
    const D2Plan<scalar_t>&, const scalar_t*, scalar_t*, at::opmath_type<scalar_t>, int64_t,
    int64_t, at::opmath_type<scalar_t>*, const at::opmath_type<scalar_t>*);

template <typename scalar_t>
TM_TARGET_AVX2_FMA void d2_forward_rows_fma(
    const D2Plan<scalar_t>& plan, const scalar_t* x, scalar_t* out, at::opmath_type<scalar_t> pad,
    int64_t begin, int64_t end, at::opmath_type<scalar_t>* buf, const at::opmath_type<scalar_t>* pad_row) {
  d2_forward_rows<scalar_t>(plan, x, out, pad, begin, end, buf, pad_row);
}

template <typename scalar_t>
void d2_forward_rows_plain(
    const D2Plan<scalar_t>& plan, const scalar_t* x, scalar_t* out, at::opmath_type<scalar_t> pad,
    int64_t begin, int64_t end, at::opmath_type<scalar_t>* buf, const at::opmath_type<scalar_t>* pad_row) {
  d2_forward_rows<scalar_t>(plan, x, out, pad, begin, end, buf, pad_row);
}

// ---- backward ------------------------------------------------------------------------------

// Backward (a gather), per grad_x row (n, Y): an opmath accumulator for the V*U rows of grad_x
// at Y (phase split like the forward's buffer) receives, in the order of d2_backward_element
// (row tap iy, v' ascending, column tap ix, u' ascending), the grad rows (n, v', u', y') with
// lam*y' + v' - Vo//2 = Y - iy: one fma per (v', u') and distinct in-grid target (v, u) of their
// window taps, with the total weight d2_window_weight gives (both taps when they coincide), over
// the whole row (unit stride, vectorised; four targets in one pass, accumulate_four). Each row of grad_x is then written once.

// The in-grid window indices d' reads, with their total weights (as d2_window_weight).
template <typename opmath_t>
struct D2Targets {
  int n;
  int64_t d[2];
  opmath_t w[2];
};

template <typename opmath_t>
std::vector<D2Targets<opmath_t>> d2_targets(int64_t in, int64_t out, int64_t lam) {
  std::vector<D2Targets<opmath_t>> table(out);
  for (int64_t dp = 0; dp < out; ++dp) {
    const D2Tap<opmath_t> t = d2_window_tap<opmath_t>(dp, lam);
    D2Targets<opmath_t>& e = table[dp];
    e.n = 0;
    const int64_t cand[2] = {t.f, t.c};
    for (int j = 0; j < (t.f == t.c ? 1 : 2); ++j) {
      const int64_t d = cand[j];
      opmath_t w;
      if (d < 0 || d >= in || !d2_window_weight<opmath_t>(dp, d, lam, &w)) continue;
      e.d[e.n] = d;
      e.w[e.n] = w;
      ++e.n;
    }
  }
  return table;
}

// The columns of grad row u' for column tap ix: X = lam*x' + off + ix in [0, W) for x' in
// [lo, hi), at k = x' + start of phase row r.
struct D2BackColumns {
  int64_t lo, hi, start, r;
};

template <typename scalar_t>
struct D2BackPlan {
  using opmath_t = at::opmath_type<scalar_t>;
  WindowGeometry g;
  int64_t lam;
  int ny, nx;
  opmath_t syx;
  std::vector<D2Targets<opmath_t>> v, u;  // (Vo,), (Uo,)
  std::vector<D2BackColumns> cols;  // (2 * Uo,): [ix * Uo + u']
  int64_t K, plane;

  explicit D2BackPlan(const WindowGeometry& geometry) : g(geometry), lam(geometry.s) {
    ny = g.Vo % 2 == 0 ? 2 : 1;
    nx = g.Uo % 2 == 0 ? 2 : 1;
    syx = tm_mul(d2_spatial_weight<opmath_t>(g.Vo, 0), d2_spatial_weight<opmath_t>(g.Uo, 0));
    v = d2_targets<opmath_t>(g.V, g.Vo, lam);
    u = d2_targets<opmath_t>(g.U, g.Uo, lam);
    cols.resize(2 * g.Uo);
    for (int ix = 0; ix < 2; ++ix) {
      for (int64_t up = 0; up < g.Uo; ++up) {
        const int64_t off = up - g.Uo / 2 + ix;
        D2BackColumns& c = cols[ix * g.Uo + up];
        valid_range(off, lam, g.W, g.Wo, &c.lo, &c.hi);
        c.r = pos_mod(off, lam);
        c.start = floor_div(off, lam);
      }
    }
    K = (g.W + lam - 1) / lam;
    plane = lam * K;
  }
};

// grad_x rows (n, Y) for i in [begin, end), i = n*H + Y.
template <typename scalar_t>
C10_ALWAYS_INLINE void d2_backward_rows(
    const D2BackPlan<scalar_t>& plan, const scalar_t* grad, scalar_t* grad_x, int64_t begin,
    int64_t end, at::opmath_type<scalar_t>* acc) {
  using opmath_t = at::opmath_type<scalar_t>;
  const WindowGeometry& g = plan.g;
  const int64_t lam = plan.lam;
  const int64_t HW = g.H * g.W, VU = g.V * g.U, out_plane = g.Ho * g.Wo;
  const int64_t K = plan.K;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = i / g.H, Y = i % g.H;
    std::fill(acc, acc + VU * plan.plane, opmath_t(0));
    for (int iy = 0; iy < plan.ny; ++iy) {
      const int64_t rv = Y - iy + g.Vo / 2;  // = lam*y' + v'
      for (int64_t vp = pos_mod(rv, lam); vp < g.Vo; vp += lam) {
        const int64_t yp = floor_div(rv - vp, lam);
        if (yp < 0 || yp >= g.Ho) continue;
        const D2Targets<opmath_t>& ev = plan.v[vp];
        if (ev.n == 0) continue;
        opmath_t wyxv[2];
        for (int a = 0; a < ev.n; ++a) wyxv[a] = tm_mul(plan.syx, ev.w[a]);
        const scalar_t* go_v = grad + (n * g.Vo + vp) * g.Uo * out_plane + yp * g.Wo;
        for (int ix = 0; ix < plan.nx; ++ix) {
          const scalar_t* go = go_v;
          for (int64_t up = 0; up < g.Uo; ++up, go += out_plane) {
            if (up + kD2PrefetchPlanes < g.Uo) prefetch_row(go + kD2PrefetchPlanes * out_plane, g.Wo);
            const D2Targets<opmath_t>& eu = plan.u[up];
            const D2BackColumns& c = plan.cols[ix * g.Uo + up];
            opmath_t* row = acc + c.r * K;  // phase row r of plane (0, 0)
            if (ev.n == 2 && eu.n == 2) {
              accumulate_four(
                  go, row + (ev.d[0] * g.U + eu.d[0]) * plan.plane,
                  row + (ev.d[0] * g.U + eu.d[1]) * plan.plane,
                  row + (ev.d[1] * g.U + eu.d[0]) * plan.plane,
                  row + (ev.d[1] * g.U + eu.d[1]) * plan.plane, tm_mul(wyxv[0], eu.w[0]),
                  tm_mul(wyxv[0], eu.w[1]), tm_mul(wyxv[1], eu.w[0]), tm_mul(wyxv[1], eu.w[1]),
                  c.start, c.lo, c.hi);
              continue;
            }
            for (int a = 0; a < ev.n; ++a) {
              for (int b = 0; b < eu.n; ++b) {
                const opmath_t w = tm_mul(wyxv[a], eu.w[b]);
                opmath_t* __restrict d = row + (ev.d[a] * g.U + eu.d[b]) * plan.plane;
                const scalar_t* __restrict src = go;
                const int64_t lo = c.lo, hi = c.hi, start = c.start;
                for (int64_t q = lo; q < hi; ++q) {
                  d[q + start] = tm_fma(w, static_cast<opmath_t>(src[q]), d[q + start]);
                }
              }
            }
          }
        }
      }
    }
    scalar_t* rows = grad_x + (n * VU * g.H + Y) * g.W;  // row Y of plane (n, 0, 0)
    for (int64_t vu = 0; vu < VU; ++vu) {
      unstage_row(acc + vu * plan.plane, rows + vu * HW, lam, K, g.W);
    }
  }
}

template <typename scalar_t>
using D2BackwardRowsFn = void (*)(
    const D2BackPlan<scalar_t>&, const scalar_t*, scalar_t*, int64_t, int64_t,
    at::opmath_type<scalar_t>*);

template <typename scalar_t>
TM_TARGET_AVX2_FMA void d2_backward_rows_fma(
    const D2BackPlan<scalar_t>& plan, const scalar_t* grad, scalar_t* grad_x, int64_t begin,
    int64_t end, at::opmath_type<scalar_t>* acc) {
  d2_backward_rows<scalar_t>(plan, grad, grad_x, begin, end, acc);
}

template <typename scalar_t>
void d2_backward_rows_plain(
    const D2BackPlan<scalar_t>& plan, const scalar_t* grad, scalar_t* grad_x, int64_t begin,
    int64_t end, at::opmath_type<scalar_t>* acc) {
  d2_backward_rows<scalar_t>(plan, grad, grad_x, begin, end, acc);
}

}  // namespace

void detectron2_forward(const at::Tensor& x, at::Tensor& out, const WindowGeometry& g, double pad) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "tensormask_detectron2_forward_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const D2Plan<scalar_t> plan(g);
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        // The pad value enters the weighted sum: converted to opmath directly.
        const opmath_t pad_o = static_cast<opmath_t>(pad);
        const D2ForwardRowsFn<scalar_t> rows =
            use_fma_clone() ? &d2_forward_rows_fma<scalar_t> : &d2_forward_rows_plain<scalar_t>;
        at::parallel_for(0, g.N * plan.n_rows, 1, [&](int64_t begin, int64_t end) {
          std::vector<opmath_t> buf(plan.staged ? 2 * g.V * g.U * plan.plane + kD2Block : 0, pad_o);
          const std::vector<opmath_t> pad_row(g.Wo + kD2Block, pad_o);
          rows(plan, xp, op, pad_o, begin, end, buf.data(), pad_row.data());
        });
      });
}

void detectron2_backward(const at::Tensor& grad, at::Tensor& grad_x, const WindowGeometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "tensormask_detectron2_backward_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const D2BackPlan<scalar_t> plan(g);
        const scalar_t* gp = grad.const_data_ptr<scalar_t>();
        scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
        const D2BackwardRowsFn<scalar_t> rows =
            use_fma_clone() ? &d2_backward_rows_fma<scalar_t> : &d2_backward_rows_plain<scalar_t>;
        at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
          std::vector<opmath_t> acc(g.V * g.U * plan.plane);
          rows(plan, gp, gxp, begin, end, acc.data());
        });
      });
}

}  // namespace cpu
}  // namespace tensormask

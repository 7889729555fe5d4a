// Bilinear resampling of the window grid on the CPU: up_align2nat (bilinear) and swap_align2nat.
// window_math.h has the per-element math (forward_element, backward_element); these kernels add
// the same terms, in the same order, a row at a time.
//
// Both directions work on one input row (n, Y) at a time: output row (n, v', u', y') reads input
// row Y = s*y' + a*(v' - Vo/2) of the planes (v*, u*) of its taps, so the output rows that read
// row Y are those of the v' with Y - a*(v' - Vo/2) a multiple of s (V of them when s = lam > 1,
// Vo when s = 1), each with every u'. The V*U input rows at Y (300 KB in float for 15x15 windows
// and W = 336) stay in cache while all of those output rows are made from them, and every input
// row is read from memory once.
//
// Forward, per (n, Y): the V*U input rows at Y are staged in an opmath buffer, split by column
// phase when s > 1 (buffer row r of a plane holds X = s*k + r at k), so that each output row's
// loop over x' reads four unit-stride rows (vectorised, no division or modulo in it); each output
// row of this Y is then written once. (float input with s = 1 is read in place.) Output rows
// whose Y is outside [0, H) hold pad_value only: a separate pass over (n, v') writes them.
//
// Backward (a gather), per (n, Y): an opmath accumulator for the V*U rows of grad_x at Y (phase
// split like the forward's buffer) receives the grad rows of this Y, v' ascending then u'
// ascending, one fma per (v', u') and distinct tap target (taps that coincide at the window
// grid's border add their weights first, as axis_weight does; an interior (v', u') adds to its four
// targets in one pass over its grad row): the order and arithmetic of
// backward_element, so the result is deterministic and equal to the CUDA kernel's. Each row of
// grad_x is then written once.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>
#include <vector>

#include "cpu_kernels.h"

namespace tensormask {
namespace cpu {
namespace {

// One output window index (v' or u'): the forward's taps, and the backward's distinct targets.
template <typename opmath_t>
struct WindowIndex {
  AxisTap<opmath_t> tap;
  int n_targets;  // 1 when both taps read the same index (at the border), else 2
  int64_t target[2];
  opmath_t weight[2];  // axis_weight(d', target): l0, l1, or l0 + l1
};

template <typename opmath_t>
std::vector<WindowIndex<opmath_t>> window_indices(int64_t in, int64_t out, int32_t mode) {
  std::vector<WindowIndex<opmath_t>> table(out);
  for (int64_t d = 0; d < out; ++d) {
    WindowIndex<opmath_t>& e = table[d];
    e.tap = axis_tap<opmath_t>(d, in, out, mode);
    if (e.tap.i0 == e.tap.i1) {
      e.n_targets = 1;
      e.target[0] = e.tap.i0;
      e.weight[0] = e.tap.l0 + e.tap.l1;
    } else {
      e.n_targets = 2;
      e.target[0] = e.tap.i0;
      e.target[1] = e.tap.i1;
      e.weight[0] = e.tap.l0;
      e.weight[1] = e.tap.l1;
    }
  }
  return table;
}

// The columns of output window index u': X = s*x' + off for x' in [lo, hi) (inside [0, W)),
// found at k = x' + start of phase row r = X mod s.
struct Columns {
  int64_t lo, hi, start, r;
};

// What every (n, Y) task needs, computed once per call.
template <typename scalar_t>
struct Plan {
  using opmath_t = at::opmath_type<scalar_t>;
  // float/double with s = 1: read the input rows in place; otherwise stage them (phase split,
  // converted to opmath).
  static constexpr bool kSameType = std::is_same<scalar_t, opmath_t>::value;

  WindowGeometry g;
  std::vector<WindowIndex<opmath_t>> v, u;  // (Vo,), (Uo,)
  std::vector<Columns> cols;  // (Uo,)
  int64_t K;  // phase row length ceil(W / s)
  int64_t plane;  // buffer elements per (v, u): s * K
  bool staged;

  explicit Plan(const WindowGeometry& geometry) : g(geometry) {
    v = window_indices<opmath_t>(g.V, g.Vo, g.mode);
    u = window_indices<opmath_t>(g.U, g.Uo, g.mode);
    cols.resize(g.Uo);
    for (int64_t up = 0; up < g.Uo; ++up) {
      const int64_t off = g.a * (up - g.Uo / 2);
      Columns& c = cols[up];
      valid_range(off, g.s, g.W, g.Wo, &c.lo, &c.hi);
      c.r = pos_mod(off, g.s);
      c.start = floor_div(off, g.s);
    }
    K = (g.W + g.s - 1) / g.s;
    plane = g.s * K;
    staged = g.s > 1 || !kSameType;
  }

  // The v' whose output rows read input row Y, ascending: first, step; y' = out_row(Y, v').
  void rows_of(int64_t Y, int64_t* first, int64_t* step) const {
    // s > 1 needs a == 1: Y - (v' - Vo/2) a multiple of s.
    *first = g.s > 1 ? pos_mod(Y + g.Vo / 2, g.s) : 0;
    *step = g.s;
  }
  int64_t out_row(int64_t Y, int64_t vp) const {
    const int64_t yp = floor_div(Y - g.a * (vp - g.Vo / 2), g.s);
    return yp >= 0 && yp < g.Ho ? yp : -1;
  }
};

// ---- forward -------------------------------------------------------------------------------

// The input rows of one (n, Y) lie in V*U planes, one short row (W values) each: too short for
// the hardware prefetcher to run ahead, so the row kPrefetchRows ahead is requested explicitly.
constexpr int64_t kPrefetchRows = 6;
// Output (grad) rows of consecutive u' are a plane apart: the row kPrefetchPlanes ahead.
constexpr int64_t kPrefetchPlanes = 4;

// o[q] for q in [lo, hi) from the four tap rows, column x' = q at p..[q + start].
template <typename scalar_t, typename opmath_t, int kFour>
C10_ALWAYS_INLINE void bilinear_row(
    scalar_t* __restrict o, const opmath_t* __restrict p00, const opmath_t* __restrict p01,
    const opmath_t* __restrict p10, const opmath_t* __restrict p11, int64_t start, int64_t lo,
    int64_t hi, const AxisTap<opmath_t>& tv, const AxisTap<opmath_t>& tu) {
  if (kFour) {
    const opmath_t w00 = tv.l0 * tu.l0, w01 = tv.l0 * tu.l1;
    const opmath_t w10 = tv.l1 * tu.l0, w11 = tv.l1 * tu.l1;
    for (int64_t q = lo; q < hi; ++q) {
      const int64_t k = q + start;
      o[q] = static_cast<scalar_t>(
          bilinear_four_weight(p00[k], p01[k], p10[k], p11[k], w00, w01, w10, w11));
    }
  } else {
    const opmath_t lv0 = tv.l0, lv1 = tv.l1, lu0 = tu.l0, lu1 = tu.l1;
    for (int64_t q = lo; q < hi; ++q) {
      const int64_t k = q + start;
      o[q] = static_cast<scalar_t>(
          bilinear_separable(p00[k], p01[k], p10[k], p11[k], lv0, lv1, lu0, lu1));
    }
  }
}

// Output rows of input rows (n, Y) for i in [begin, end), i = n*H + Y.
template <typename scalar_t, int kFour>
C10_ALWAYS_INLINE void forward_rows(
    const Plan<scalar_t>& plan, const scalar_t* x, scalar_t* out, scalar_t pad, int64_t begin,
    int64_t end, at::opmath_type<scalar_t>* buf) {
  using opmath_t = at::opmath_type<scalar_t>;
  const WindowGeometry& g = plan.g;
  const int64_t HW = g.H * g.W, VU = g.V * g.U, out_plane = g.Ho * g.Wo;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = i / g.H, Y = i % g.H;
    const scalar_t* rows = x + (n * VU * g.H + Y) * g.W;  // row Y of plane (n, 0, 0)
    // (v*, u*, phase r) -> the opmath row holding x[n, v*, u*, Y, s*k + r] at k.
    const opmath_t* base = buf;
    int64_t vu_stride = plan.plane, r_stride = plan.K;
    if constexpr (Plan<scalar_t>::kSameType) {
      if (!plan.staged) {
        base = rows;
        vu_stride = HW;
        r_stride = 0;
      }
    }
    if (plan.staged) {
      for (int64_t vu = 0; vu < VU; ++vu) {
        const scalar_t* src = rows + vu * HW;
        if (vu + kPrefetchRows < VU) prefetch_row(src + kPrefetchRows * HW, g.W);
        opmath_t* dst = buf + vu * plan.plane;
        stage_row(src, dst, g.s, plan.K, g.W);
      }
    }
    int64_t first, step;
    plan.rows_of(Y, &first, &step);
    for (int64_t vp = first; vp < g.Vo; vp += step) {
      const int64_t yp = plan.out_row(Y, vp);
      if (yp < 0) continue;
      const AxisTap<opmath_t>& tv = plan.v[vp].tap;
      scalar_t* o = out + (n * g.Vo + vp) * g.Uo * out_plane + yp * g.Wo;
      for (int64_t up = 0; up < g.Uo; ++up, o += out_plane) {
        if (up + kPrefetchPlanes < g.Uo) prefetch_row_w(o + kPrefetchPlanes * out_plane, g.Wo);
        const Columns& c = plan.cols[up];
        std::fill(o, o + c.lo, pad);
        std::fill(o + c.hi, o + g.Wo, pad);
        const AxisTap<opmath_t>& tu = plan.u[up].tap;
        const opmath_t* phase = base + c.r * r_stride;
        bilinear_row<scalar_t, opmath_t, kFour>(
            o, phase + (tv.i0 * g.U + tu.i0) * vu_stride, phase + (tv.i0 * g.U + tu.i1) * vu_stride,
            phase + (tv.i1 * g.U + tu.i0) * vu_stride, phase + (tv.i1 * g.U + tu.i1) * vu_stride,
            c.start, c.lo, c.hi, tv, tu);
      }
    }
  }
}

template <typename scalar_t>
using ForwardRowsFn = void (*)(
    const Plan<scalar_t>&, const scalar_t*, scalar_t*, scalar_t, int64_t, int64_t,
    at::opmath_type<scalar_t>*);

template <typename scalar_t, int kFour>
TM_TARGET_AVX2_FMA void forward_rows_fma(
    const Plan<scalar_t>& plan, const scalar_t* x, scalar_t* out, scalar_t pad, int64_t begin,
    int64_t end, at::opmath_type<scalar_t>* buf) {
  forward_rows<scalar_t, kFour>(plan, x, out, pad, begin, end, buf);
}

template <typename scalar_t, int kFour>
void forward_rows_plain(
    const Plan<scalar_t>& plan, const scalar_t* x, scalar_t* out, scalar_t pad, int64_t begin,
    int64_t end, at::opmath_type<scalar_t>* buf) {
  forward_rows<scalar_t, kFour>(plan, x, out, pad, begin, end, buf);
}

template <typename scalar_t>
ForwardRowsFn<scalar_t> pick_forward(const WindowGeometry& g) {
  const bool four = g.order == kFourWeight;
  if (use_fma_clone()) {
    return four ? &forward_rows_fma<scalar_t, 1> : &forward_rows_fma<scalar_t, 0>;
  }
  return four ? &forward_rows_plain<scalar_t, 1> : &forward_rows_plain<scalar_t, 0>;
}

// The output rows whose Y is outside [0, H): pad_value.
template <typename scalar_t>
void fill_pad_rows(scalar_t* out, const WindowGeometry& g, scalar_t pad) {
  const int64_t out_plane = g.Ho * g.Wo;
  at::parallel_for(0, g.N * g.Vo, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t y_lo, y_hi;
      valid_range(g.a * (i % g.Vo - g.Vo / 2), g.s, g.H, g.Ho, &y_lo, &y_hi);
      scalar_t* slab = out + i * g.Uo * out_plane;
      for (int64_t up = 0; up < g.Uo; ++up) {
        scalar_t* o = slab + up * out_plane;
        std::fill(o, o + y_lo * g.Wo, pad);
        std::fill(o + y_hi * g.Wo, o + out_plane, pad);
      }
    }
  });
}

// ---- backward ------------------------------------------------------------------------------

// grad_x rows (n, Y) for i in [begin, end), i = n*H + Y.
template <typename scalar_t>
C10_ALWAYS_INLINE void backward_rows(
    const Plan<scalar_t>& plan, const scalar_t* grad, scalar_t* grad_x, int64_t begin,
    int64_t end, at::opmath_type<scalar_t>* acc) {
  using opmath_t = at::opmath_type<scalar_t>;
  const WindowGeometry& g = plan.g;
  const int64_t HW = g.H * g.W, VU = g.V * g.U, out_plane = g.Ho * g.Wo;
  const int64_t K = plan.K, s = g.s;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = i / g.H, Y = i % g.H;
    std::fill(acc, acc + VU * plan.plane, opmath_t(0));
    int64_t first, step;
    plan.rows_of(Y, &first, &step);
    for (int64_t vp = first; vp < g.Vo; vp += step) {
      const int64_t yp = plan.out_row(Y, vp);
      if (yp < 0) continue;
      const WindowIndex<opmath_t>& ev = plan.v[vp];
      const scalar_t* go = grad + (n * g.Vo + vp) * g.Uo * out_plane + yp * g.Wo;
      for (int64_t up = 0; up < g.Uo; ++up, go += out_plane) {
        if (up + kPrefetchPlanes < g.Uo) prefetch_row(go + kPrefetchPlanes * out_plane, g.Wo);
        const Columns& c = plan.cols[up];
        const WindowIndex<opmath_t>& eu = plan.u[up];
        opmath_t* row = acc + c.r * K;  // phase row r of plane (0, 0)
        if (ev.n_targets == 2 && eu.n_targets == 2) {
          accumulate_four(
              go, row + (ev.target[0] * g.U + eu.target[0]) * plan.plane,
              row + (ev.target[0] * g.U + eu.target[1]) * plan.plane,
              row + (ev.target[1] * g.U + eu.target[0]) * plan.plane,
              row + (ev.target[1] * g.U + eu.target[1]) * plan.plane,
              ev.weight[0] * eu.weight[0], ev.weight[0] * eu.weight[1],
              ev.weight[1] * eu.weight[0], ev.weight[1] * eu.weight[1], c.start, c.lo, c.hi);
          continue;
        }
        for (int a = 0; a < ev.n_targets; ++a) {
          for (int b = 0; b < eu.n_targets; ++b) {
            const opmath_t w = ev.weight[a] * eu.weight[b];
            opmath_t* __restrict d = row + (ev.target[a] * g.U + eu.target[b]) * plan.plane;
            const scalar_t* __restrict src = go;
            const int64_t lo = c.lo, hi = c.hi, start = c.start;
            for (int64_t q = lo; q < hi; ++q) {
              d[q + start] = tm_fma(w, static_cast<opmath_t>(src[q]), d[q + start]);
            }
          }
        }
      }
    }
    scalar_t* rows = grad_x + (n * VU * g.H + Y) * g.W;  // row Y of plane (n, 0, 0)
    for (int64_t vu = 0; vu < VU; ++vu) {
      scalar_t* dst = rows + vu * HW;
      const opmath_t* a = acc + vu * plan.plane;
      unstage_row(a, dst, s, K, g.W);
    }
  }
}

template <typename scalar_t>
using BackwardRowsFn = void (*)(
    const Plan<scalar_t>&, const scalar_t*, scalar_t*, int64_t, int64_t,
    at::opmath_type<scalar_t>*);

template <typename scalar_t>
TM_TARGET_AVX2_FMA void backward_rows_fma(
    const Plan<scalar_t>& plan, const scalar_t* grad, scalar_t* grad_x, int64_t begin,
    int64_t end, at::opmath_type<scalar_t>* acc) {
  backward_rows<scalar_t>(plan, grad, grad_x, begin, end, acc);
}

template <typename scalar_t>
void backward_rows_plain(
    const Plan<scalar_t>& plan, const scalar_t* grad, scalar_t* grad_x, int64_t begin,
    int64_t end, at::opmath_type<scalar_t>* acc) {
  backward_rows<scalar_t>(plan, grad, grad_x, begin, end, acc);
}

}  // namespace

void bilinear_forward(const at::Tensor& x, at::Tensor& out, const WindowGeometry& g, double pad) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "tensormask_bilinear_forward_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const Plan<scalar_t> plan(g);
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        const scalar_t pad_s = static_cast<scalar_t>(pad);
        const ForwardRowsFn<scalar_t> rows = pick_forward<scalar_t>(g);
        at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
          std::vector<opmath_t> buf(plan.staged ? g.V * g.U * plan.plane : 0);
          rows(plan, xp, op, pad_s, begin, end, buf.data());
        });
        fill_pad_rows(op, g, pad_s);
      });
}

void bilinear_backward(const at::Tensor& grad, at::Tensor& grad_x, const WindowGeometry& g) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "tensormask_bilinear_backward_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const Plan<scalar_t> plan(g);
        const scalar_t* gp = grad.const_data_ptr<scalar_t>();
        scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
        const BackwardRowsFn<scalar_t> rows =
            use_fma_clone() ? &backward_rows_fma<scalar_t> : &backward_rows_plain<scalar_t>;
        at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
          std::vector<opmath_t> acc(g.V * g.U * plan.plane);
          rows(plan, gp, gxp, begin, end, acc.data());
        });
      });
}

}  // namespace cpu
}  // namespace tensormask

// The per-element index and weight math of the TensorMask window ops (paper §3), shared by the
// CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) so that both compute the same thing.
//
// All four ops are one resampling of a 5-D tensor x (N, V, U, H, W) into out (N, Vo, Uo, Ho, Wo):
//
//   Y = s*y' + a*(v' - Vo/2),   X = s*x' + a*(u' - Uo/2)
//   out[n, v', u', y', x'] = pad_value                         if (Y, X) is outside [0,H)x[0,W)
//                          = interp_{(V,U)->(Vo,Uo)}(x[n, :, :, Y, X]) at (v', u')   otherwise
//
//   align2nat(alpha):  a = alpha,  s = 1, identity interpolation
//   nat2align(alpha):  a = -alpha, s = 1, identity interpolation
//   up_align2nat:      a = 1,      s = 1, bilinear or nearest resize (any ratio)
//   swap_align2nat(lam): a = 1,    s = lam, bilinear resize by lam, Ho = ceil(H/lam)
//
// (swap_align2nat_detectron2, Detectron2's variant of swap_align2nat, samples differently: see
// the section at the end of this file.)
//
// Arithmetic. The pure-PyTorch references resize with F.interpolate(align_corners=False), and the
// float64 forward must equal them bit for bit. ATen's CPU kernels (UpSample.h, UpSampleKernel.cpp)
// are compiled with FMA contraction (the AVX2/AVX512 builds), so the exact sequence is (measured;
// see csrc/NOTES-aten-arithmetic.md):
//   src   = fma(scale, d + 0.5, -0.5), scale = (opmath)in / out;  src < 0 -> 0
//   i0    = min((int64)floorf((float)src), in - 1)   (through float!)
//   l1    = clamp(src - i0, 0, 1);  l0 = 1 - l1;  i1 = i0 + (i0 < in - 1)
//   (in == out: i0 = i1 = d, l0 = 1, l1 = 0)
// and the 2-D evaluation depends on which ATen kernel F.interpolate picks for an (M, 1, V, U)
// input, which it decides by the OUTPUT size (_use_vectorized_kernel_cond_2d: Vo + Uo <= 128):
//   kFourWeight (Vo + Uo <= 128, channels-last kernel):
//       w_ij = lv_i * lu_j;  t = fma(x00, w00, x01*w01);  t = fma(x10, w10, t);
//       out = fma(x11, w11, t)
//   kSeparable (Vo + Uo > 128, generic separable kernel):
//       g0 = fma(x00, lu0, x01*lu1);  g1 = fma(x10, lu0, x11*lu1);  out = fma(g0, lv0, g1*lv1)
// (V is the outer axis, U the inner one.) Nearest: float scale = (float)in / out,
// src = min((int64)floorf(d * scale), in - 1), src = d when in == out.
//
// Every multiply-add below is an explicit fma (std::fma on the host, __fma_rn on the device) and no
// expression has the form a*b + c, so neither GCC's nor nvcc's FMA contraction can change a result:
// CPU and CUDA round identically, with or without -mfma / --fmad.
//
// Backward (a gather, no atomics): grad_x[n, v, u, Y, X] is the sum, over the output elements
// (v', u', y', x') that read x[n, v, u, Y, X], of w_v(v' -> v) * w_u(u' -> u) * grad_out[...],
// added in the order v' ascending, then u' ascending, as acc = fma(w_v * w_u, g, acc). The
// candidate v' of an input index v form a contiguous range of about 2*Vo/V + 5 indices
// (axis_candidates, a conservative bound; membership is then tested with the forward's own
// axis_tap), and with s > 1 (which requires a = 1) only the v' with v' = Y + Vo/2 (mod s) have an
// integral y', so the loop steps by s: O(1) work per input element whatever lam.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace tensormask {

// How the window grid (V, U) is resampled to (Vo, Uo).
enum InterpMode : int32_t { kIdentity = 0, kBilinear = 1, kNearest = 2 };
// Which of ATen's two bilinear evaluation orders to reproduce (see above).
enum BilinearOrder : int32_t { kSeparable = 0, kFourWeight = 1 };

// Which sampling of (Y, X) and of the window grid: the paper's (all ops above), or Detectron2's
// swap_align2nat (half-pixel rows and columns, no clamping at the window-grid rim; see below).
enum Sampling : int32_t { kPaperSampling = 0, kDetectron2Sampling = 1 };

// Everything a kernel needs, passed by value (also to CUDA kernels).
struct WindowGeometry {
  int64_t N, V, U, H, W;  // input  (N, V, U, H, W)
  int64_t Vo, Uo, Ho, Wo;  // output (N, Vo, Uo, Ho, Wo)
  int64_t a;  // window shift per step: alpha (align2nat), -alpha (nat2align), 1 (up/swap)
  int64_t s;  // spatial stride of the output grid: 1, or lam (swap_align2nat; needs a == 1)
  int32_t mode;  // InterpMode
  int32_t order;  // BilinearOrder
  int32_t sampling;  // Sampling
};

// ---- scalar helpers ------------------------------------------------------------------------

C10_HOST_DEVICE inline float tm_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

C10_HOST_DEVICE inline double tm_fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

C10_HOST_DEVICE inline float tm_floorf(float v) {
#if defined(__CUDA_ARCH__)
  return floorf(v);
#else
  return std::floor(v);
#endif
}

C10_HOST_DEVICE inline float tm_floor(float v) { return tm_floorf(v); }
C10_HOST_DEVICE inline double tm_floor(double v) {
#if defined(__CUDA_ARCH__)
  return ::floor(v);
#else
  return std::floor(v);
#endif
}

// A product and a sum rounded once each, never contracted to an fma (the Detectron2 variant's
// arithmetic is the reference's: separate multiplies and adds). On the device the _rn intrinsics
// are never contracted; on the host setup.py compiles with -ffp-contract=off.
C10_HOST_DEVICE inline float tm_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
C10_HOST_DEVICE inline double tm_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
C10_HOST_DEVICE inline float tm_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
C10_HOST_DEVICE inline double tm_add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// Python's floor division and modulo (b > 0).
C10_HOST_DEVICE inline int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
C10_HOST_DEVICE inline int64_t pos_mod(int64_t a, int64_t b) {
  const int64_t r = a % b;
  return r < 0 ? r + b : r;
}

// ---- one axis of the window-grid resize ----------------------------------------------------

// Output index d of an axis resized in -> out reads input indices i0, i1 with weights l0, l1.
template <typename opmath_t>
struct AxisTap {
  int64_t i0, i1;
  opmath_t l0, l1;
};

// ATen's compute_source_index_and_lambda (bilinear, align_corners=False, size given) and
// nearest_idx, replicated operation for operation.
template <typename opmath_t>
C10_HOST_DEVICE inline AxisTap<opmath_t> axis_tap(
    int64_t d, int64_t in, int64_t out, int32_t mode) {
  AxisTap<opmath_t> t;
  if (mode == kIdentity || in == out) {
    t.i0 = d;
    t.i1 = d;
    t.l0 = opmath_t(1);
    t.l1 = opmath_t(0);
    return t;
  }
  if (mode == kNearest) {
    int64_t src;
    if (out == 2 * in) {
      src = d >> 1;
    } else {
      const float scale = static_cast<float>(in) / static_cast<float>(out);
      src = static_cast<int64_t>(tm_floorf(static_cast<float>(d) * scale));
      src = src < in - 1 ? src : in - 1;
    }
    t.i0 = src;
    t.i1 = src;
    t.l0 = opmath_t(1);
    t.l1 = opmath_t(0);
    return t;
  }
  const opmath_t scale = static_cast<opmath_t>(in) / static_cast<opmath_t>(out);
  opmath_t src = tm_fma(scale, static_cast<opmath_t>(d) + opmath_t(0.5), opmath_t(-0.5));
  if (src < opmath_t(0)) src = opmath_t(0);
  int64_t i0 = static_cast<int64_t>(tm_floorf(static_cast<float>(src)));
  i0 = i0 < in - 1 ? i0 : in - 1;
  opmath_t l1 = src - static_cast<opmath_t>(i0);
  l1 = l1 > opmath_t(0) ? l1 : opmath_t(0);
  l1 = l1 < opmath_t(1) ? l1 : opmath_t(1);
  t.i0 = i0;
  t.i1 = i0 + (i0 < in - 1 ? 1 : 0);
  t.l1 = l1;
  t.l0 = opmath_t(1) - l1;
  return t;
}

// Whether output index dp reads input index d, and with which total weight (both taps count when
// i0 == i1 == d, e.g. at the border).
template <typename opmath_t>
C10_HOST_DEVICE inline bool axis_weight(
    int64_t dp, int64_t d, int64_t in, int64_t out, int32_t mode, opmath_t* w) {
  const AxisTap<opmath_t> t = axis_tap<opmath_t>(dp, in, out, mode);
  if (t.i0 != d && t.i1 != d) return false;
  *w = (t.i0 == d ? t.l0 : opmath_t(0)) + (t.i1 == d ? t.l1 : opmath_t(0));
  return true;
}

// A conservative inclusive range [lo, hi] of the output indices dp whose taps may include input
// index d; membership is decided by axis_weight. Exact for identity.
C10_HOST_DEVICE inline void axis_candidates(
    int64_t d, int64_t in, int64_t out, int32_t mode, int64_t* lo, int64_t* hi) {
  if (mode == kIdentity || in == out) {
    *lo = d;
    *hi = d;
    return;
  }
  int64_t l, h;
  if (mode == kNearest) {
    // src(dp) = floor(dp * in/out) == d  <=>  dp in [d*out/in, (d+1)*out/in), up to float rounding.
    l = floor_div(d * out, in) - 2;
    h = floor_div((d + 1) * out, in) + 2;
  } else {
    // src(dp) = (dp + 0.5)*in/out - 0.5 must lie in [d - 1, d + 1), up to float rounding.
    l = floor_div((2 * d - 1) * out - in, 2 * in) - 2;
    h = floor_div((2 * d + 3) * out - in, 2 * in) + 2;
  }
  if (d == in - 1) h = out - 1;  // i0 is clamped to in - 1
  *lo = l > 0 ? l : 0;
  *hi = h < out - 1 ? h : out - 1;
}

// ---- forward -------------------------------------------------------------------------------

template <typename opmath_t>
C10_HOST_DEVICE inline opmath_t bilinear_separable(
    opmath_t x00, opmath_t x01, opmath_t x10, opmath_t x11, opmath_t lv0, opmath_t lv1,
    opmath_t lu0, opmath_t lu1) {
  const opmath_t g0 = tm_fma(x00, lu0, x01 * lu1);
  const opmath_t g1 = tm_fma(x10, lu0, x11 * lu1);
  return tm_fma(g0, lv0, g1 * lv1);
}

// w00 = lv0*lu0, w01 = lv0*lu1, w10 = lv1*lu0, w11 = lv1*lu1 (each rounded once).
template <typename opmath_t>
C10_HOST_DEVICE inline opmath_t bilinear_four_weight(
    opmath_t x00, opmath_t x01, opmath_t x10, opmath_t x11, opmath_t w00, opmath_t w01,
    opmath_t w10, opmath_t w11) {
  opmath_t t = tm_fma(x00, w00, x01 * w01);
  t = tm_fma(x10, w10, t);
  return tm_fma(x11, w11, t);
}

// The window value of x[n, :, :, Y, X] at (v', u'), given the two axis taps. `plane` points to
// x[n, 0, 0, Y, X]; consecutive (v, u) planes are H*W apart.
template <typename scalar_t, typename opmath_t>
C10_HOST_DEVICE inline opmath_t interp_value(
    const scalar_t* plane, int64_t U, int64_t HW, const AxisTap<opmath_t>& tv,
    const AxisTap<opmath_t>& tu, int32_t mode, int32_t order) {
  if (mode != kBilinear) {
    return static_cast<opmath_t>(plane[(tv.i0 * U + tu.i0) * HW]);
  }
  const opmath_t x00 = static_cast<opmath_t>(plane[(tv.i0 * U + tu.i0) * HW]);
  const opmath_t x01 = static_cast<opmath_t>(plane[(tv.i0 * U + tu.i1) * HW]);
  const opmath_t x10 = static_cast<opmath_t>(plane[(tv.i1 * U + tu.i0) * HW]);
  const opmath_t x11 = static_cast<opmath_t>(plane[(tv.i1 * U + tu.i1) * HW]);
  if (order == kFourWeight) {
    return bilinear_four_weight(
        x00, x01, x10, x11, tv.l0 * tu.l0, tv.l0 * tu.l1, tv.l1 * tu.l0, tv.l1 * tu.l1);
  }
  return bilinear_separable(x00, x01, x10, x11, tv.l0, tv.l1, tu.l0, tu.l1);
}

// out[n, vp, up, yp, xp] (the CUDA forward evaluates this once per output element; the CPU
// forward hoists the same computations out of its loops).
template <typename scalar_t, typename opmath_t>
C10_HOST_DEVICE inline scalar_t forward_element(
    const scalar_t* x, const WindowGeometry& g, int64_t n, int64_t vp, int64_t up, int64_t yp,
    int64_t xp, scalar_t pad) {
  const int64_t Y = g.s * yp + g.a * (vp - g.Vo / 2);
  const int64_t X = g.s * xp + g.a * (up - g.Uo / 2);
  if (Y < 0 || Y >= g.H || X < 0 || X >= g.W) return pad;
  const AxisTap<opmath_t> tv = axis_tap<opmath_t>(vp, g.V, g.Vo, g.mode);
  const AxisTap<opmath_t> tu = axis_tap<opmath_t>(up, g.U, g.Uo, g.mode);
  const int64_t HW = g.H * g.W;
  const scalar_t* plane = x + n * g.V * g.U * HW + Y * g.W + X;
  return static_cast<scalar_t>(interp_value(plane, g.U, HW, tv, tu, g.mode, g.order));
}

// ---- backward ------------------------------------------------------------------------------

// First candidate and step along one axis for input position P (Y or X) and input index d:
// with s > 1 (a == 1) only dp = P + out/2 (mod s) gives an integral output position.
C10_HOST_DEVICE inline void axis_scan(
    int64_t d, int64_t P, int64_t in, int64_t out, const WindowGeometry& g, int64_t* first,
    int64_t* last, int64_t* step) {
  int64_t lo, hi;
  axis_candidates(d, in, out, g.mode, &lo, &hi);
  if (g.s > 1) lo += pos_mod(P + out / 2 - lo, g.s);
  *first = lo;
  *last = hi;
  *step = g.s;
}

// Output position (y' or x') that reads input position P through output window index dp, or -1.
C10_HOST_DEVICE inline int64_t output_pos(
    int64_t P, int64_t dp, int64_t out, int64_t out_len, const WindowGeometry& g) {
  const int64_t num = P - g.a * (dp - out / 2);
  if (g.s > 1 && pos_mod(num, g.s) != 0) return -1;
  const int64_t q = g.s > 1 ? floor_div(num, g.s) : num;
  return (q >= 0 && q < out_len) ? q : -1;
}

// grad_x[n, v, u, Y, X] (the CUDA backward evaluates this once per input element; the CPU
// backward adds the same terms, in the same order, row by row).
template <typename scalar_t, typename opmath_t>
C10_HOST_DEVICE inline opmath_t backward_element(
    const scalar_t* grad_out, const WindowGeometry& g, int64_t n, int64_t v, int64_t u, int64_t Y,
    int64_t X) {
  int64_t v_first, v_last, v_step, u_first, u_last, u_step;
  axis_scan(v, Y, g.V, g.Vo, g, &v_first, &v_last, &v_step);
  axis_scan(u, X, g.U, g.Uo, g, &u_first, &u_last, &u_step);
  const int64_t plane = g.Ho * g.Wo;
  opmath_t acc = opmath_t(0);
  for (int64_t vp = v_first; vp <= v_last; vp += v_step) {
    const int64_t yp = output_pos(Y, vp, g.Vo, g.Ho, g);
    opmath_t wv;
    if (yp < 0 || !axis_weight<opmath_t>(vp, v, g.V, g.Vo, g.mode, &wv)) continue;
    const scalar_t* row = grad_out + (n * g.Vo + vp) * g.Uo * plane + yp * g.Wo;
    for (int64_t up = u_first; up <= u_last; up += u_step) {
      const int64_t xp = output_pos(X, up, g.Uo, g.Wo, g);
      opmath_t wu;
      if (xp < 0 || !axis_weight<opmath_t>(up, u, g.U, g.Uo, g.mode, &wu)) continue;
      acc = tm_fma(wv * wu, static_cast<opmath_t>(row[up * plane + xp]), acc);
    }
  }
  return acc;
}

// ---- swap_align2nat in Detectron2's geometry (swap_align2nat_detectron2) ----------------------
//
// Detectron2's TensorMask (projects/TensorMask, SwapAlign2Nat) samples, for lam >= 1,
// Vo = lam*V, Uo = lam*U, Ho = ceil(H/lam), Wo = ceil(W/lam):
//
//   oy = lam*y' + v' - Vo/2 + 1/2  (Vo/2 a real division),   ox likewise with x', u', Uo
//   ov = (v' + 1/2)/lam - 1/2,                                ou likewise with u'
//
// and adds, over the 16 (floor|ceil) combinations of (oy, ox, ov, ou) (y outermost, then x, v,
// u; floor before ceil), weight * x[n, v*, u*, y*, x*], the weight being
// ((wy * wx) * wv) * wu with w_ceil = o - floor(o), w_floor = 1 - w_ceil. A tap with any index
// outside its axis ([0,H), [0,W), [0,V), [0,U)) reads pad_value: unlike the paper op, the window
// grid is not clamped at its rim, and when Vo is even oy is half-integral (two rows, weights 1/2).
// With Vo odd, oy is integral: rows y* = lam*y' + v' - Vo//2 (weight 1; the ceil row is the same
// row with weight 0). Either way the rows are Y0 = lam*y' + v' - Vo//2 and Y0 + 1 (integer math).
//
// Arithmetic (opmath: float for float/half/bfloat16, double for double): the weights as above,
// then acc = 0; acc = acc + w * t for each term in that order, every product and sum rounded once
// (tm_mul / tm_add): the literal order of ops.reference.swap_align2nat_detectron2, so the kernels
// equal it bit for bit. Terms of weight 0 are skipped: adding +-0 to acc (never -0: it starts at
// +0 and x + (-x) = +0) changes nothing, for finite inputs.
//
// Backward (a gather, no atomics): grad_x[n, v, u, Y, X] adds, in the order y tap (floor, ceil),
// v' ascending, x tap, u' ascending, acc = fma(((sy*sx) * wv) * wu, g, acc), where wv is the
// total weight with which v' reads v (both taps when floor == ceil == v) and sy = 1/2 (Vo even) or
// 1 (Vo odd). For a row tap iy, y' is integral only for v' = Y - iy + Vo//2 (mod lam): the scan
// steps by lam over a conservative candidate range of about 3*lam.

template <typename opmath_t>
struct D2Tap {
  int64_t f, c;  // floor and ceil indices (possibly outside [0, in))
  opmath_t wf, wc;  // their weights
};

// Window axis: o = (d + 1/2)/lam - 1/2.
template <typename opmath_t>
C10_HOST_DEVICE inline D2Tap<opmath_t> d2_window_tap(int64_t d, int64_t lam) {
  const opmath_t o =
      (static_cast<opmath_t>(d) + opmath_t(0.5)) / static_cast<opmath_t>(lam) - opmath_t(0.5);
  const opmath_t f = tm_floor(o);
  D2Tap<opmath_t> t;
  t.f = static_cast<int64_t>(f);
  t.c = o == f ? t.f : t.f + 1;  // ceil(o)
  t.wc = o - f;
  t.wf = opmath_t(1) - t.wc;
  return t;
}

// Spatial axis of output length `out` (Vo or Uo): rows lam*y' + d - out//2 + {0, 1} with weights
// (1/2, 1/2) when out is even, (1, 0) when odd.
template <typename opmath_t>
C10_HOST_DEVICE inline opmath_t d2_spatial_weight(int64_t out, int64_t i) {
  if (out % 2 == 0) return opmath_t(0.5);
  return i == 0 ? opmath_t(1) : opmath_t(0);
}

// out[n, vp, up, yp, xp] (the CUDA forward evaluates this once per output element; the CPU
// forward does it at the rim and adds the same terms row by row inside).
template <typename scalar_t, typename opmath_t>
C10_HOST_DEVICE inline scalar_t d2_forward_element(
    const scalar_t* x, const WindowGeometry& g, int64_t n, int64_t vp, int64_t up, int64_t yp,
    int64_t xp, opmath_t pad) {
  const int64_t lam = g.s;
  const D2Tap<opmath_t> tv = d2_window_tap<opmath_t>(vp, lam);
  const D2Tap<opmath_t> tu = d2_window_tap<opmath_t>(up, lam);
  const int64_t vi[2] = {tv.f, tv.c}, ui[2] = {tu.f, tu.c};
  const opmath_t wv[2] = {tv.wf, tv.wc}, wu[2] = {tu.wf, tu.wc};
  const int64_t Y0 = lam * yp + vp - g.Vo / 2;
  const int64_t X0 = lam * xp + up - g.Uo / 2;
  const scalar_t* xn = x + n * g.V * g.U * g.H * g.W;
  opmath_t acc = opmath_t(0);
  for (int iy = 0; iy < 2; ++iy) {
    const int64_t Y = Y0 + iy;
    const opmath_t wy = d2_spatial_weight<opmath_t>(g.Vo, iy);
    for (int ix = 0; ix < 2; ++ix) {
      const int64_t X = X0 + ix;
      const opmath_t wyx = tm_mul(wy, d2_spatial_weight<opmath_t>(g.Uo, ix));
      const bool yx_in = Y >= 0 && Y < g.H && X >= 0 && X < g.W;
      for (int iv = 0; iv < 2; ++iv) {
        const opmath_t wyxv = tm_mul(wyx, wv[iv]);
        for (int iu = 0; iu < 2; ++iu) {
          const opmath_t w = tm_mul(wyxv, wu[iu]);
          if (w == opmath_t(0)) continue;
          const bool in = yx_in && vi[iv] >= 0 && vi[iv] < g.V && ui[iu] >= 0 && ui[iu] < g.U;
          const opmath_t t =
              in ? static_cast<opmath_t>(xn[((vi[iv] * g.U + ui[iu]) * g.H + Y) * g.W + X]) : pad;
          acc = tm_add(acc, tm_mul(w, t));
        }
      }
    }
  }
  return static_cast<scalar_t>(acc);
}

// Whether window index dp reads input index d, and with which total weight.
template <typename opmath_t>
C10_HOST_DEVICE inline bool d2_window_weight(int64_t dp, int64_t d, int64_t lam, opmath_t* w) {
  const D2Tap<opmath_t> t = d2_window_tap<opmath_t>(dp, lam);
  if (t.f != d && t.c != d) return false;
  *w = (t.f == d ? t.wf : opmath_t(0)) + (t.c == d ? t.wc : opmath_t(0));
  return true;
}

// A conservative inclusive range [lo, hi] of the window indices dp that may read input index d
// ((dp + 1/2)/lam - 1/2 in (d - 1, d + 1) needs dp in (lam*(d - 1/2) - 1/2, lam*(d + 3/2) - 1/2)).
C10_HOST_DEVICE inline void d2_window_candidates(
    int64_t d, int64_t lam, int64_t out, int64_t* lo, int64_t* hi) {
  const int64_t l = lam * (d - 1) - 1;
  const int64_t h = lam * (d + 2) + 1;
  *lo = l > 0 ? l : 0;
  *hi = h < out - 1 ? h : out - 1;
}

// grad_x[n, v, u, Y, X] (the CUDA backward evaluates this once per input element; the CPU
// backward adds the same terms, in the same order, row by row).
template <typename scalar_t, typename opmath_t>
C10_HOST_DEVICE inline opmath_t d2_backward_element(
    const scalar_t* grad_out, const WindowGeometry& g, int64_t n, int64_t v, int64_t u, int64_t Y,
    int64_t X) {
  const int64_t lam = g.s;
  const int ny = g.Vo % 2 == 0 ? 2 : 1;
  const int nx = g.Uo % 2 == 0 ? 2 : 1;
  const opmath_t syx =
      tm_mul(d2_spatial_weight<opmath_t>(g.Vo, 0), d2_spatial_weight<opmath_t>(g.Uo, 0));
  int64_t v_lo, v_hi, u_lo, u_hi;
  d2_window_candidates(v, lam, g.Vo, &v_lo, &v_hi);
  d2_window_candidates(u, lam, g.Uo, &u_lo, &u_hi);
  const int64_t plane = g.Ho * g.Wo;
  const scalar_t* go_n = grad_out + n * g.Vo * g.Uo * plane;
  opmath_t acc = opmath_t(0);
  for (int iy = 0; iy < ny; ++iy) {
    const int64_t rv = Y - iy + g.Vo / 2;  // = lam*y' + v'
    for (int64_t vp = v_lo + pos_mod(rv - v_lo, lam); vp <= v_hi; vp += lam) {
      const int64_t yp = (rv - vp) / lam;
      opmath_t wv;
      if (yp < 0 || yp >= g.Ho || !d2_window_weight<opmath_t>(vp, v, lam, &wv)) continue;
      const opmath_t wyxv = tm_mul(syx, wv);
      const scalar_t* row = go_n + vp * g.Uo * plane + yp * g.Wo;
      for (int ix = 0; ix < nx; ++ix) {
        const int64_t ru = X - ix + g.Uo / 2;  // = lam*x' + u'
        for (int64_t up = u_lo + pos_mod(ru - u_lo, lam); up <= u_hi; up += lam) {
          const int64_t xp = (ru - up) / lam;
          opmath_t wu;
          if (xp < 0 || xp >= g.Wo || !d2_window_weight<opmath_t>(up, u, lam, &wu)) continue;
          acc = tm_fma(tm_mul(wyxv, wu), static_cast<opmath_t>(row[up * plane + xp]), acc);
        }
      }
    }
  }
  return acc;
}

}  // namespace tensormask

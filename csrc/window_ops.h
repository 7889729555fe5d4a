// Host-side glue shared by the CPU and CUDA registrations: argument checks, the WindowGeometry of
// each op, and the ten operator entry points written once over a backend's two generic kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "window_math.h"

namespace tensormask {

// Geometries (implemented in csrc/tensormask_ops.cpp). `in` is the input shape (N, V, U, H, W).
WindowGeometry align2nat_geometry(at::IntArrayRef in, int64_t alpha, const char* op);
WindowGeometry nat2align_geometry(at::IntArrayRef in, int64_t alpha, const char* op);
WindowGeometry up_align2nat_geometry(
    at::IntArrayRef in, int64_t out_v, int64_t out_u, const std::string& mode, const char* op);
WindowGeometry swap_align2nat_geometry(at::IntArrayRef in, int64_t lam, const char* op);
WindowGeometry swap_align2nat_detectron2_geometry(at::IntArrayRef in, int64_t lam, const char* op);

// Checks a forward input (5-D floating point) and a backward's grad (its shape must be the output
// shape of `g`) and input_shape argument.
void check_input(const at::Tensor& x, const char* op);
// The kernels' preconditions on a geometry (e.g. a stride s > 1 needs a == 1).
void check_geometry(const WindowGeometry& g, const char* op);
void check_grad(const at::Tensor& grad, const WindowGeometry& g, const char* op);
at::IntArrayRef check_input_shape(at::IntArrayRef input_shape, const char* op);

// The ten operators over a backend's generic kernels:
//   Forward(x, g, pad_value) -> out (g's output shape)
//   Backward(grad, g) -> grad_x (g's input shape)
template <
    at::Tensor (*Forward)(const at::Tensor&, const WindowGeometry&, double),
    at::Tensor (*Backward)(const at::Tensor&, const WindowGeometry&)>
struct WindowOps {
  static at::Tensor forward(
      const at::Tensor& x, const WindowGeometry& g, double pad, const char* op) {
    check_geometry(g, op);
    return Forward(x, g, pad);
  }
  static at::Tensor backward(const at::Tensor& grad, const WindowGeometry& g, const char* op) {
    check_geometry(g, op);
    check_grad(grad, g, op);
    return Backward(grad, g);
  }
  static at::Tensor align2nat(const at::Tensor& x, int64_t alpha, double pad_value) {
    check_input(x, "align2nat");
    return forward(x, align2nat_geometry(x.sizes(), alpha, "align2nat"), pad_value, "align2nat");
  }
  static at::Tensor align2nat_backward(const at::Tensor& grad, int64_t alpha) {
    check_input(grad, "align2nat_backward");
    const WindowGeometry g = align2nat_geometry(grad.sizes(), alpha, "align2nat_backward");
    return backward(grad, g, "align2nat_backward");
  }
  static at::Tensor nat2align(const at::Tensor& x, int64_t alpha, double pad_value) {
    check_input(x, "nat2align");
    return forward(x, nat2align_geometry(x.sizes(), alpha, "nat2align"), pad_value, "nat2align");
  }
  static at::Tensor nat2align_backward(const at::Tensor& grad, int64_t alpha) {
    check_input(grad, "nat2align_backward");
    const WindowGeometry g = nat2align_geometry(grad.sizes(), alpha, "nat2align_backward");
    return backward(grad, g, "nat2align_backward");
  }
  static at::Tensor up_align2nat(
      const at::Tensor& x, int64_t out_v, int64_t out_u, c10::string_view mode,
      double pad_value) {
    check_input(x, "up_align2nat");
    const std::string mode_s(mode.data(), mode.size());
    const WindowGeometry g = up_align2nat_geometry(x.sizes(), out_v, out_u, mode_s, "up_align2nat");
    return forward(x, g, pad_value, "up_align2nat");
  }
  static at::Tensor up_align2nat_backward(
      const at::Tensor& grad, at::IntArrayRef input_shape, c10::string_view mode) {
    check_input(grad, "up_align2nat_backward");
    const at::IntArrayRef in = check_input_shape(input_shape, "up_align2nat_backward");
    const std::string mode_s(mode.data(), mode.size());
    const WindowGeometry g = up_align2nat_geometry(
        in, grad.size(1), grad.size(2), mode_s, "up_align2nat_backward");
    return backward(grad, g, "up_align2nat_backward");
  }
  static at::Tensor swap_align2nat(const at::Tensor& x, int64_t lam, double pad_value) {
    check_input(x, "swap_align2nat");
    const WindowGeometry g = swap_align2nat_geometry(x.sizes(), lam, "swap_align2nat");
    return forward(x, g, pad_value, "swap_align2nat");
  }
  static at::Tensor swap_align2nat_backward(
      const at::Tensor& grad, at::IntArrayRef input_shape, int64_t lam) {
    check_input(grad, "swap_align2nat_backward");
    const at::IntArrayRef in = check_input_shape(input_shape, "swap_align2nat_backward");
    const WindowGeometry g = swap_align2nat_geometry(in, lam, "swap_align2nat_backward");
    return backward(grad, g, "swap_align2nat_backward");
  }
  static at::Tensor swap_align2nat_detectron2(const at::Tensor& x, int64_t lam, double pad_value) {
    constexpr const char* op = "swap_align2nat_detectron2";
    check_input(x, op);
    return forward(x, swap_align2nat_detectron2_geometry(x.sizes(), lam, op), pad_value, op);
  }
  static at::Tensor swap_align2nat_detectron2_backward(
      const at::Tensor& grad, at::IntArrayRef input_shape, int64_t lam) {
    constexpr const char* op = "swap_align2nat_detectron2_backward";
    check_input(grad, op);
    const at::IntArrayRef in = check_input_shape(input_shape, op);
    return backward(grad, swap_align2nat_detectron2_geometry(in, lam, op), op);
  }
};

}  // namespace tensormask

// Registers the ten operators of `Ops` (a WindowOps<...>) on the library handle `m`.
#define TENSORMASK_IMPL_WINDOW_OPS(m, Ops)                                         \
  do {                                                                             \
    m.impl("align2nat", TORCH_FN(Ops::align2nat));                                 \
    m.impl("align2nat_backward", TORCH_FN(Ops::align2nat_backward));               \
    m.impl("nat2align", TORCH_FN(Ops::nat2align));                                 \
    m.impl("nat2align_backward", TORCH_FN(Ops::nat2align_backward));               \
    m.impl("up_align2nat", TORCH_FN(Ops::up_align2nat));                           \
    m.impl("up_align2nat_backward", TORCH_FN(Ops::up_align2nat_backward));         \
    m.impl("swap_align2nat", TORCH_FN(Ops::swap_align2nat));                       \
    m.impl("swap_align2nat_backward", TORCH_FN(Ops::swap_align2nat_backward));     \
    m.impl("swap_align2nat_detectron2", TORCH_FN(Ops::swap_align2nat_detectron2)); \
    m.impl(                                                                        \
        "swap_align2nat_detectron2_backward",                                      \
        TORCH_FN(Ops::swap_align2nat_detectron2_backward));                        \
  } while (0)

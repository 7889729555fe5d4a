// The `tensormask` operator library: schemas (declared once, here), the geometry of each op, and
// the Python module stub that makes `import tensormask_ray._C` load this shared library (and with
// it the TORCH_LIBRARY_IMPL registrations of csrc/cpu and csrc/cuda).
//
// Kernels: csrc/cpu/window_ops_cpu.cpp (CPU), csrc/cuda/window_ops_cuda.cu (CUDA).
// Python side: tensormask_ray/ops/library.py (fake tensors, autograd), ops/api.py (the public
// wrappers).

#include <Python.h>
#include <torch/library.h>

#include "window_ops.h"

namespace tensormask {

namespace {

void check_shape(at::IntArrayRef in, const char* op) {
  TORCH_CHECK(in.size() == 5, op, ": expected a 5-D (N, V, U, H, W) shape, got ", in);
  for (const int64_t d : in) TORCH_CHECK(d >= 0, op, ": negative size in ", in);
}

WindowGeometry base_geometry(at::IntArrayRef in) {
  WindowGeometry g{};
  g.N = in[0];
  g.V = in[1];
  g.U = in[2];
  g.H = in[3];
  g.W = in[4];
  g.Vo = g.V;
  g.Uo = g.U;
  g.Ho = g.H;
  g.Wo = g.W;
  g.a = 1;
  g.s = 1;
  g.mode = kIdentity;
  g.order = kSeparable;
  g.sampling = kPaperSampling;
  return g;
}

// ATen's CPU F.interpolate(bilinear) on an (M, 1, V, U) input picks its channels-last kernel when
// out_h + out_w <= 128 (_use_vectorized_kernel_cond_2d in UpSampleKernel.cpp) and the generic
// separable kernel otherwise; the two round differently (see window_math.h).
int32_t bilinear_order(int64_t Vo, int64_t Uo) {
  return Vo + Uo <= 128 ? kFourWeight : kSeparable;
}

// A resize to the same (V, U) is a copy: ATen's taps are then (d, d) with weights (1, 0), which
// give x exactly (barring an inf/nan neighbour, which 0 * inf would turn into nan there).
WindowGeometry same_size_is_identity(WindowGeometry g) {
  if (g.Vo == g.V && g.Uo == g.U) g.mode = kIdentity;
  return g;
}

}  // namespace

WindowGeometry align2nat_geometry(at::IntArrayRef in, int64_t alpha, const char* op) {
  check_shape(in, op);
  TORCH_CHECK(alpha >= 1, op, ": alpha must be >= 1, got ", alpha);
  WindowGeometry g = base_geometry(in);
  g.a = alpha;
  return g;
}

WindowGeometry nat2align_geometry(at::IntArrayRef in, int64_t alpha, const char* op) {
  WindowGeometry g = align2nat_geometry(in, alpha, op);
  g.a = -alpha;
  return g;
}

WindowGeometry up_align2nat_geometry(
    at::IntArrayRef in, int64_t out_v, int64_t out_u, const std::string& mode, const char* op) {
  check_shape(in, op);
  TORCH_CHECK(
      out_v >= 1 && out_u >= 1, op, ": out_v, out_u must be >= 1, got ", out_v, ", ", out_u);
  TORCH_CHECK(
      mode == "bilinear" || mode == "nearest", op,
      ": mode must be 'bilinear' or 'nearest', got '", mode, "'");
  WindowGeometry g = base_geometry(in);
  TORCH_CHECK(
      (g.V > 0 && g.U > 0) || g.N * g.H * g.W == 0, op,
      ": cannot resize an empty window grid (V, U) = (", g.V, ", ", g.U, ")");
  g.Vo = out_v;
  g.Uo = out_u;
  g.mode = mode == "bilinear" ? kBilinear : kNearest;
  g.order = bilinear_order(g.Vo, g.Uo);
  return same_size_is_identity(g);
}

WindowGeometry swap_align2nat_geometry(at::IntArrayRef in, int64_t lam, const char* op) {
  check_shape(in, op);
  TORCH_CHECK(lam >= 1, op, ": lam must be >= 1, got ", lam);
  WindowGeometry g = base_geometry(in);
  g.Vo = lam * g.V;
  g.Uo = lam * g.U;
  g.Ho = (g.H + lam - 1) / lam;
  g.Wo = (g.W + lam - 1) / lam;
  g.s = lam;
  g.mode = kBilinear;
  g.order = bilinear_order(g.Vo, g.Uo);
  return same_size_is_identity(g);
}

// Detectron2's swap_align2nat (window_math.h): the output shape of swap_align2nat, its own
// sampling. Never an identity (with lam = 1 and even V the rows and columns are averaged).
WindowGeometry swap_align2nat_detectron2_geometry(at::IntArrayRef in, int64_t lam, const char* op) {
  check_shape(in, op);
  TORCH_CHECK(lam >= 1, op, ": lam must be >= 1, got ", lam);
  WindowGeometry g = base_geometry(in);
  g.Vo = lam * g.V;
  g.Uo = lam * g.U;
  g.Ho = (g.H + lam - 1) / lam;
  g.Wo = (g.W + lam - 1) / lam;
  g.s = lam;
  g.mode = kBilinear;
  g.sampling = kDetectron2Sampling;
  return g;
}

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.defined(), op, ": got an undefined tensor");
  TORCH_CHECK(x.dim() == 5, op, ": expected a 5-D (N, V, U, H, W) tensor, got shape ", x.sizes());
  TORCH_CHECK(
      at::isFloatingType(x.scalar_type()), op, ": expected a floating-point tensor, got ",
      x.scalar_type());
}

void check_geometry(const WindowGeometry& g, const char* op) {
  TORCH_CHECK(g.s >= 1, op, ": stride must be >= 1, got ", g.s);
  TORCH_CHECK(g.s == 1 || g.a == 1, op, ": a stride > 1 needs a window shift of 1, got ", g.a);
  TORCH_CHECK(
      g.mode == kIdentity || g.mode == kBilinear || g.mode == kNearest, op, ": bad mode ", g.mode);
  TORCH_CHECK(
      g.mode != kIdentity || (g.Vo == g.V && g.Uo == g.U), op, ": identity needs Vo == V, Uo == U");
  TORCH_CHECK(
      g.sampling == kPaperSampling || g.sampling == kDetectron2Sampling, op, ": bad sampling ",
      g.sampling);
  TORCH_CHECK(
      g.sampling == kPaperSampling ||
          (g.a == 1 && g.mode == kBilinear && g.Vo == g.s * g.V && g.Uo == g.s * g.U),
      op, ": Detectron2 sampling is swap_align2nat's geometry (a = 1, bilinear, lam x size)");
}

void check_grad(const at::Tensor& grad, const WindowGeometry& g, const char* op) {
  const std::array<int64_t, 5> expected{g.N, g.Vo, g.Uo, g.Ho, g.Wo};
  TORCH_CHECK(
      grad.sizes() == at::IntArrayRef(expected), op, ": grad has shape ", grad.sizes(),
      ", expected the forward's output shape ", at::IntArrayRef(expected));
}

at::IntArrayRef check_input_shape(at::IntArrayRef input_shape, const char* op) {
  check_shape(input_shape, op);
  return input_shape;
}

}  // namespace tensormask

TORCH_LIBRARY(tensormask, m) {
  // Forward ops (see tensormask_ray/ops/api.py for the semantics).
  m.def("align2nat(Tensor x, int alpha, float pad_value) -> Tensor");
  m.def("nat2align(Tensor x, int alpha, float pad_value) -> Tensor");
  m.def("up_align2nat(Tensor x, int out_v, int out_u, str mode, float pad_value) -> Tensor");
  m.def("swap_align2nat(Tensor x, int lam, float pad_value) -> Tensor");
  m.def("swap_align2nat_detectron2(Tensor x, int lam, float pad_value) -> Tensor");
  // Their backward ops: grad is the forward's output gradient, the result the input's.
  m.def("align2nat_backward(Tensor grad, int alpha) -> Tensor");
  m.def("nat2align_backward(Tensor grad, int alpha) -> Tensor");
  m.def("up_align2nat_backward(Tensor grad, SymInt[] input_shape, str mode) -> Tensor");
  m.def("swap_align2nat_backward(Tensor grad, SymInt[] input_shape, int lam) -> Tensor");
  m.def(
      "swap_align2nat_detectron2_backward(Tensor grad, SymInt[] input_shape, int lam) -> Tensor");
}

// `import tensormask_ray._C` loads this library, which runs the registrations above. The module
// holds no functions (the ops are reached through torch.ops.tensormask.*), only `with_cuda`:
// whether this build compiled the CUDA kernels (setup.py defines TENSORMASK_WITH_CUDA then).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "TensorMask fused ops; use torch.ops.tensormask.*",  // doc
      -1,  // size of per-interpreter state
      nullptr,  // methods
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef TENSORMASK_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

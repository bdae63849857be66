// Host side of the layer-norm op: validates every argument (on any build, with or without CUDA)
// and picks the vector width, then hands over to the kernel launchers.
#include "layer_norm.h"

#include <initializer_list>
#include <string>

#include "../common/cuda_runtime.h"

namespace fusedlm::layer_norm {
namespace {

void check_params(const std::optional<TensorView>& w, const std::optional<TensorView>& b,
                  const TensorView& x) {
  for (const auto* p : {&w, &b}) {
    if (!*p) continue;
    check_vector(**p, x.shape[1]);
    if ((*p)->dtype != x.dtype && (*p)->dtype != DType::kFloat32)
      throw DTypeError(std::string((*p)->name) + " must be " + dtype_name(x.dtype) +
                       " or float32 (x's dtype or float32), got " + dtype_name((*p)->dtype));
  }
  if (w && b && w->dtype != b->dtype)
    throw DTypeError(std::string("bias must have weight's dtype ") + dtype_name(w->dtype) +
                     ", got " + dtype_name(b->dtype));
}

void check_stats(const std::optional<TensorView>& mean, const TensorView& rstd, bool rms,
                 const TensorView& x) {
  if (!rms && !mean) throw ArgError("mean is required for layer norm (only RMSNorm omits it)");
  for (const TensorView* s : {mean ? &*mean : nullptr, &rstd}) {
    if (!s) continue;
    check_vector(*s, x.shape[0]);
    check_dtype(*s, DType::kFloat32);
  }
}

void check_like(const std::optional<TensorView>& t, const TensorView& x) {
  if (!t) return;
  check_matrix(*t, x.shape[0], x.shape[1]);
  check_dtype(*t, x.dtype);
}

// Device checks come last, so shape and dtype errors are reported the same on any machine.
void check_devices(const TensorView& ref, std::initializer_list<const TensorView*> all) {
  for (const TensorView* t : all)
    if (t) check_same_device(*t, ref);
}

void check_input(const TensorView& x) {
  check_float_dtype(x);
  check_matrix(x, -1, -1);
  if (x.shape[0] > 0x7fffffff)  // one block per row in the forward: the grid's x limit
    throw ArgError(std::string(x.name) + " must have fewer than 2^31 rows, got " +
                   std::to_string(x.shape[0]));
  if (x.shape[1] < 1 || x.shape[1] > kMaxColumns)
    throw ArgError(std::string(x.name) + " must have between 1 and " +
                   std::to_string(kMaxColumns) + " columns, got " + std::to_string(x.shape[1]));
}

// 16-byte vectors when every row of every (rows, n) tensor starts 16-byte aligned.
int pick_vec(const TensorView& x, std::initializer_list<const TensorView*> rows) {
  const int vec = 16 / dtype_size(x.dtype);
  if (x.shape[1] % vec != 0) return 1;
  for (const TensorView* t : rows)
    if (t && (reinterpret_cast<std::uintptr_t>(t->data) % 16 != 0 || t->stride[0] % vec != 0))
      return 1;
  return vec;
}

const TensorView* ptr(const std::optional<TensorView>& t) { return t ? &*t : nullptr; }

// The kernels' dropout leaves out float32 rows of 4097-8192 columns read one value at a time
// (not 16-byte vectors): that backward spilled with it (layer_norm_kernels.cu: drops).
void check_dropout_fits(const Dropout& d, const TensorView& x, int vec) {
  if (d.p > 0.0 && x.dtype == DType::kFloat32 && vec == 1 && x.shape[1] > kMaxColumns / 2)
    throw ArgError("the CUDA C++ kernel's dropout takes float32 rows of more than " +
                   std::to_string(kMaxColumns / 2) + " columns only as 16-byte vectors (a " +
                   "multiple of 4 columns, rows 16-byte aligned); got " +
                   std::to_string(x.shape[1]) + " columns");
}

void check_dropout(const Dropout& d) {
  if (!(d.p >= 0.0 && d.p < 1.0))
    throw ArgError("dropout p must be in [0, 1), got " + std::to_string(d.p));
  if (!d.seed_tensor) return;
  const TensorView& s = *d.seed_tensor;
  check_dtype(s, DType::kInt64);
  if (!(s.ndim == 0 || (s.ndim == 1 && s.shape[0] == 1)))
    throw ArgError(std::string(s.name) + " must hold one element, got shape " + str(s));
}

void require_cuda() {
  if (!built_with_cuda())
    throw_built_without_cuda();
}

}  // namespace

void forward(const ForwardArgs& a, std::uintptr_t stream) {
  check_input(a.x);
  check_like(a.residual, a.x);
  check_params(a.weight, a.bias, a.x);
  check_like(a.y, a.x);
  check_like(a.z, a.x);
  check_dropout(a.dropout);
  if (a.z && !a.residual && a.dropout.p == 0.0)
    throw ArgError("z (the stored sum) is only written with a residual or dropout (else it is x)");
  check_stats(a.mean, a.rstd, a.rms, a.x);
  if (!(a.eps >= 0.0f)) throw ArgError("eps must be a non-negative float");
  check_devices(a.x, {&a.x, ptr(a.residual), ptr(a.weight), ptr(a.bias), &a.y, ptr(a.z),
                      ptr(a.mean), &a.rstd, ptr(a.dropout.seed_tensor)});
  require_cuda();
  const int vec = pick_vec(a.x, {&a.x, ptr(a.residual), &a.y, ptr(a.z)});
  check_dropout_fits(a.dropout, a.x, vec);
  if (a.x.shape[0] == 0) return;
  launch_forward(a, vec, stream);
}

void backward(const BackwardArgs& a, std::uintptr_t stream) {
  check_input(a.dy);
  check_like(a.z, a.dy);
  check_like(a.dz_extra, a.dy);
  check_like(a.dz, a.dy);
  check_like(a.dx, a.dy);
  check_dropout(a.dropout);
  if (a.dropout.p > 0.0 ? !a.dx : !a.dz)
    throw ArgError(a.dropout.p > 0.0 ? "dx (x's gradient) is required with dropout"
                                      : "dz (the input's gradient) is required");
  if (a.dx && a.dropout.p == 0.0)
    throw ArgError("dx is written with dropout only (without, x's gradient is dz)");
  check_params(a.weight, std::nullopt, a.dy);
  check_stats(a.mean, a.rstd, a.rms, a.dy);
  if (a.dweight && (!a.weight || !a.dw_part))
    throw ArgError("dweight needs weight and dw_part");
  if (a.dbias && !a.db_part) throw ArgError("dbias needs db_part");
  int64_t programs = -1;
  for (const auto* pair : {&a.dw_part, &a.db_part}) {
    if (!*pair) continue;
    check_matrix(**pair, programs, a.dy.shape[1]);
    check_dtype(**pair, DType::kFloat32);
    if ((*pair)->stride[0] != a.dy.shape[1]) throw ArgError(std::string((*pair)->name) + " must be contiguous");
    programs = (*pair)->shape[0];
    if (programs < 1 || programs > a.dy.shape[0])
      throw ArgError(std::string((*pair)->name) + " must have between 1 and rows (" +
                     std::to_string(a.dy.shape[0]) + ") rows, got " + std::to_string(programs));
  }
  for (const auto* out : {&a.dweight, &a.dbias}) {
    if (!*out) continue;
    check_vector(**out, a.dy.shape[1]);
    check_float_dtype(**out);
  }
  check_devices(a.dy, {&a.dy, &a.z, ptr(a.weight), ptr(a.mean), &a.rstd, ptr(a.dz_extra),
                       ptr(a.dz), ptr(a.dx), ptr(a.dw_part), ptr(a.db_part), ptr(a.dweight),
                       ptr(a.dbias), ptr(a.dropout.seed_tensor)});
  require_cuda();
  const int vec = pick_vec(a.dy, {&a.dy, &a.z, ptr(a.dz_extra), ptr(a.dz), ptr(a.dx)});
  check_dropout_fits(a.dropout, a.dy, vec);
  if (a.dy.shape[0] == 0) return;
  launch_backward(a, vec, stream);
}

#ifndef FUSEDLM_WITH_CUDA
void launch_forward(const ForwardArgs&, int, std::uintptr_t) { throw_built_without_cuda(); }
void launch_backward(const BackwardArgs&, int, std::uintptr_t) { throw_built_without_cuda(); }
#endif

}  // namespace fusedlm::layer_norm

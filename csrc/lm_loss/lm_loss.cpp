// Host side of the LM-loss row kernel: validates every argument (on any build, with or without
// CUDA) and picks the vector width, then hands over to the launcher.
#include "lm_loss.h"

#include <string>

#include "../common/cuda_runtime.h"

namespace fusedlm::lm_loss {

void cross_entropy_rows(const CrossEntropyRowsArgs& a, std::uintptr_t stream) {
  check_float_dtype(a.logits);
  check_matrix(a.logits, -1, -1);
  const int64_t rows = a.logits.shape[0], vocab = a.logits.shape[1];
  if (vocab < 1 || vocab > 0x7fffffff)
    throw ArgError(std::string("logits must have between 1 and 2^31 - 1 columns, got ") +
                   std::to_string(vocab));
  if (rows > 0x7fffffff)  // one block per row: the grid's x limit
    throw ArgError("logits must have fewer than 2^31 rows, got " + std::to_string(rows));
  check_vector(a.labels, rows);
  check_dtype(a.labels, DType::kInt64);
  for (const TensorView* t : {&a.loss, &a.lse, &a.hit}) {
    check_vector(*t, rows);
    check_dtype(*t, DType::kFloat32);
  }
  if (a.row_scale) {
    check_vector(*a.row_scale, rows);
    check_dtype(*a.row_scale, DType::kFloat32);
  }
  if (!(a.smoothing >= 0.0f && a.smoothing <= 1.0f))
    throw ArgError("smoothing must be in [0, 1]");
  if (!(a.z_loss >= 0.0f)) throw ArgError("z_loss must be non-negative");
  // Device checks come last, so shape and dtype errors are reported the same on any machine.
  for (const TensorView* t : {&a.logits, &a.labels, &a.loss, &a.lse, &a.hit})
    check_same_device(*t, a.logits);
  if (a.row_scale) check_same_device(*a.row_scale, a.logits);
  if (!built_with_cuda())
    throw_built_without_cuda();
  if (rows == 0) return;
  // 16-byte vectors when every row starts 16-byte aligned, whatever V (the kernel takes the
  // last V % width columns one at a time).
  const int wide = 16 / dtype_size(a.logits.dtype);
  const bool aligned = reinterpret_cast<std::uintptr_t>(a.logits.data) % 16 == 0 &&
                       a.logits.stride[0] % wide == 0;
  launch_cross_entropy_rows(a, aligned ? wide : 1, stream);
}

#ifndef FUSEDLM_WITH_CUDA
void launch_cross_entropy_rows(const CrossEntropyRowsArgs&, int, std::uintptr_t) {
  throw_built_without_cuda();
}
#endif

}  // namespace fusedlm::lm_loss

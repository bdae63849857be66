// Cross-entropy over a chunk of projected logits, loss and gradient in one kernel: the fused
// part of the LM loss (see kernels/lm_loss.py for the math, which both implementations share;
// the projection matmuls are cuBLAS calls made by fusedlm.ops.loss).
#pragma once
#include <cstdint>
#include <optional>

#include "../common/tensor.h"

namespace fusedlm::lm_loss {

struct CrossEntropyRowsArgs {
  TensorView logits;                    // (rows, V), float32/16/bf16; the gradient overwrites it
  TensorView labels;                    // (rows,) int64 in [0, V)
  TensorView loss;                      // (rows,) float32 out
  TensorView lse;                       // (rows,) float32 out: log-sum-exp of the row
  TensorView hit;                       // (rows,) float32 out: 1 where the first argmax is the label
  std::optional<TensorView> row_scale;  // (rows,) float32: per-row gradient scale
  float grad_scale = 1.0f;              // used when row_scale is absent
  float smoothing = 0.0f;
  float z_loss = 0.0f;
  bool compute_grad = false;
};

void cross_entropy_rows(const CrossEntropyRowsArgs& a, std::uintptr_t stream);

// Kernel launcher (lm_loss_kernels.cu); arguments are already validated.
void launch_cross_entropy_rows(const CrossEntropyRowsArgs& a, int vec, std::uintptr_t stream);

}  // namespace fusedlm::lm_loss

// Layer norm / RMSNorm over the last dimension with an optional fused residual add
// (see kernels/layer_norm.py for the math, which both implementations share).
#pragma once
#include <cstdint>
#include <optional>

#include "../common/tensor.h"

namespace fusedlm::layer_norm {

struct ForwardArgs {
  TensorView x;                        // (rows, n)
  std::optional<TensorView> residual;  // (rows, n), x's dtype
  std::optional<TensorView> weight;    // (n,), x's dtype or float32
  std::optional<TensorView> bias;      // (n,), weight's dtype
  TensorView y;                        // (rows, n), x's dtype
  std::optional<TensorView> z;         // (rows, n): x + residual is stored here when given
  std::optional<TensorView> mean;      // (rows,) float32; absent for RMSNorm
  TensorView rstd;                     // (rows,) float32
  float eps = 1e-5f;
  bool rms = false;
};

struct BackwardArgs {
  TensorView dy;                       // (rows, n)
  TensorView z;                        // (rows, n): the normalized input (x + residual)
  std::optional<TensorView> weight;
  std::optional<TensorView> mean;
  TensorView rstd;
  std::optional<TensorView> dz_extra;  // (rows, n): gradient flowing into the stored sum
  TensorView dz;                       // (rows, n) out
  std::optional<TensorView> dw_part;   // (programs, n) float32 scratch
  std::optional<TensorView> db_part;   // (programs, n) float32 scratch
  std::optional<TensorView> dweight;   // (n,) out, weight's dtype
  std::optional<TensorView> dbias;     // (n,) out
  bool rms = false;
};

// Largest hidden size the kernels hold in registers: 16 values a thread at 512 threads. At 32
// values the backward's per-column dweight/dbias sums alone take 64 of a thread's 128 registers
// and every such instantiation spilled 20-500 bytes (nvcc -Xptxas -v, sm_80 and sm_90a); wider
// rows are the Triton kernel's, whose launch cost no longer matters at that size.
constexpr int64_t kMaxColumns = 8192;

void forward(const ForwardArgs& a, std::uintptr_t stream);
void backward(const BackwardArgs& a, std::uintptr_t stream);

// Kernel launchers (layer_norm_kernels.cu); arguments are already validated.
void launch_forward(const ForwardArgs& a, int vec, std::uintptr_t stream);
void launch_backward(const BackwardArgs& a, int vec, std::uintptr_t stream);

}  // namespace fusedlm::layer_norm

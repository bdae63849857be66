// Layer norm / RMSNorm over the last dimension with an optional fused residual add and dropout
// of x before it (see kernels/layer_norm.py for the math, which both implementations share; the
// keep-mask is the Triton kernels', bit for bit: common/philox.h).
#pragma once
#include <cstdint>
#include <optional>

#include "../common/tensor.h"

namespace fusedlm::layer_norm {

// Dropout of x before the add: each element kept with probability 1 - p and scaled by
// 1 / (1 - p), from the seed's Philox draws (common/philox.h), the same mask both ways.
struct Dropout {
  double p = 0.0;                      // in [0, 1); 0: no dropout. The keep test uses it as
                                       // fp32, the scale 1 / (1 - p) is computed in double:
                                       // as the Triton kernels receive them
  uint64_t seed = 0;
  // A one-element int64 tensor on the data's device that holds the seed instead (torch.compile
  // draws it there: no host value in the graph). Read by the kernels as the Triton kernels read
  // it: its low 32 bits as a signed int.
  std::optional<TensorView> seed_tensor;
};

struct ForwardArgs {
  TensorView x;                        // (rows, n)
  std::optional<TensorView> residual;  // (rows, n), x's dtype
  std::optional<TensorView> weight;    // (n,), x's dtype or float32
  std::optional<TensorView> bias;      // (n,), weight's dtype
  TensorView y;                        // (rows, n), x's dtype
  std::optional<TensorView> z;         // (rows, n): dropout(x) + residual, stored when given
                                       // (only with a residual or dropout: else it is x)
  std::optional<TensorView> mean;      // (rows,) float32; absent for RMSNorm
  TensorView rstd;                     // (rows,) float32
  float eps = 1e-5f;
  bool rms = false;
  Dropout dropout;
};

struct BackwardArgs {
  TensorView dy;                       // (rows, n)
  TensorView z;                        // (rows, n): the normalized input (the forward's z, or x)
  std::optional<TensorView> weight;
  std::optional<TensorView> mean;
  TensorView rstd;
  std::optional<TensorView> dz_extra;  // (rows, n): gradient flowing into the stored sum
  std::optional<TensorView> dz;        // (rows, n) out: the sum's gradient (the residual's);
                                       // required without dropout
  std::optional<TensorView> dx;        // (rows, n) out: x's, dz dropped out as x was; with
                                       // dropout only (and then required)
  std::optional<TensorView> dw_part;   // (programs, n) float32 scratch
  std::optional<TensorView> db_part;   // (programs, n) float32 scratch
  std::optional<TensorView> dweight;   // (n,) out, weight's dtype
  std::optional<TensorView> dbias;     // (n,) out
  bool rms = false;
  Dropout dropout;                     // the forward's
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

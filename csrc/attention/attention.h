// Flash attention on tensor cores (mma.sync, sm_80 and later), forward and backward, for the
// cases BERT and GPT training need: a padding mask over keys (Hugging Face's attention_mask),
// packed variable-length batches (cu_seqlens), causal masking aligned bottom-right, grouped /
// multi-query heads. The math is the Triton kernels' (kernels/attention.py): scores in base 2
// (scale * log2 e), an online softmax over key blocks, the log-sum-exp saved for the backward,
// which recomputes the probabilities in two atomic-free kernels (dK/dV per key block, dQ per
// query block). Dropout draws the Triton kernels' mask (common/philox.h): for a seed, both
// backends drop the same probabilities, and the backward regenerates them.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include "../common/tensor.h"

namespace fusedlm::attention {

constexpr int kHeadDims[] = {32, 64, 96, 128};

// Shapes: dense q/o (B, Sq, H, D), k/v (B, Sk, Hk, D), lse (B, H, Sq); varlen (cu_q given)
// q/o (total_q, H, D), k/v (total_k, Hk, D), lse (H, total_q). Last dim unit stride.
struct Problem {
  TensorView q, k, v;
  std::optional<TensorView> key_mask;  // (B, Sk) int8, nonzero = attend; dense only
  std::optional<TensorView> cu_q, cu_k;  // (B + 1,) int32; varlen only
  int64_t max_q = 0, max_k = 0;        // longest sequence (varlen), else Sq / Sk
  bool causal = false;
  float scale = 1.0f;
  float dropout_p = 0.0f;  // in [0, 1)
  uint64_t seed = 0;       // (batch, head) stream: seed + batch * heads + head
};

struct ForwardArgs {
  Problem p;
  TensorView o;    // like q
  TensorView lse;  // float32, base-2 log-sum-exp of the scaled scores (+inf: no key, so exp2(s - lse) = 0)
  bool wgmma = false;  // try the Hopper kernel (attention_hopper.cu) first; opt-in until verified
};

struct BackwardArgs {
  Problem p;
  TensorView o;      // the forward's output, like q
  TensorView dout;   // like q
  TensorView lse;    // from the forward
  TensorView delta;  // float32 scratch, like lse: the backward writes rowsum(dO * O) there
  TensorView dq, dk, dv;
  bool wgmma = false;  // try the Hopper kernels (attention_hopper.cu) first; opt-in until verified
};

// Returns the kernel that ran: "wgmma", "mma", or "mma (wgmma declined: <why>)".
std::string forward(const ForwardArgs& a, std::uintptr_t stream);
std::string backward(const BackwardArgs& a, std::uintptr_t stream);

// The Hopper primitives the wgmma kernels are built on, one at a time: a GPU's first check that
// the hardware reads them as the kernels (and the CPU emulator, written from the same documents)
// assume. q, v: (64, 1, D), k: (128, 1, D), contiguous fp16 or bf16, D 64 or 128. raw (like q):
// q's tile as the copy engine (TMA, 128-byte swizzle) left it in shared memory, element for
// element; s (64, 64) fp32: q k[:64]^T and s_wide (64, 128) fp32: q k^T, from wgmma with both
// operands in shared memory (K-major descriptors; N = 64 as in the backward, 128 as in the
// forward); o (64, D) fp32: p v, p being s rounded to q's dtype and taken from the accumulators
// as A fragments, v read MN-major (the transpose bit). Throws where the build has no sm_90a code
// or the GPU is not compute capability 9.0.
void wgmma_probe(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& raw,
                 const TensorView& s, const TensorView& s_wide, const TensorView& o, std::uintptr_t stream);

// Launchers (attention_kernels.cu, attention_hopper.cu); arguments are already validated.
std::string launch_forward(const ForwardArgs& a, std::uintptr_t stream);
std::string launch_backward(const BackwardArgs& a, std::uintptr_t stream);
// attention_hopper.cu: throws where the build has no sm_90a code or the GPU is not 9.0.
void launch_wgmma_probe(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& raw,
                        const TensorView& s, const TensorView& s_wide, const TensorView& o, std::uintptr_t stream);

}  // namespace fusedlm::attention

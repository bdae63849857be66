// What both CUDA attention kernels (attention_kernels.cu: mma.sync, sm_80 and later;
// attention_hopper.cu: wgmma + TMA, sm_90a) share: the kernel parameters, the mask rules
// (`allowed`), the dropout draw (`kept`) and the host-side translation of a Problem.
#pragma once
#include <cstdint>
#include <string>

#include "../common/philox.h"
#include "attention.h"

namespace fusedlm::attention::detail {

constexpr float kLog2e = 1.4426950408889634f;

// A (batch, row, head, D) tensor: pointer and element strides; the batch stride is 0 for
// packed sequences, whose rows are counted from the start of the pack.
struct Operand {
  void* p = nullptr;
  int64_t b = 0, s = 0, h = 0;
};

// Row `first` of batch b, head h.
template <typename T>
__device__ __forceinline__ T* rows(const Operand& t, int b, int64_t first, int h) {
  return static_cast<T*>(t.p) + b * t.b + first * t.s + h * t.h;
}

struct Params {
  Operand q, k, v, o, dout, dq, dk, dv;
  float* lse;
  float* delta;  // rowsum(dO * O): written by the backward's first kernel, read by the others
  const int8_t* key_mask;
  int64_t mask_b;
  const int *cu_q, *cu_k;
  int64_t lse_b, lse_h;  // log-sum-exp and delta: lse[b * lse_b + h * lse_h + first_q + i]
  int seq_q, seq_k;      // dense lengths (seq_k: also the dropout counter's row pitch)
  int heads, group;      // query heads, and query heads per key/value head
  bool causal;
  float scale, scale2;   // softmax scale, and scale * log2(e)
  float p_drop;          // dropout probability
  float keep_scale;      // 1 / (1 - p_drop): a kept probability's scale (a product: a division
                         // calls a slow-path routine, whose saved registers spill)
  uint64_t seed;
  bool vec;              // every operand 16-byte aligned (pointer and strides): cp.async tiles
  bool vec_out;          // every output (o; dq, dk, dv) 16-byte aligned: 16-byte stores
};

// Is dropout's draw for probability (i, j) of stream bh a keep (common/philox.h: the counter
// wraps at 32 bits, as the Triton kernels' int32 index arithmetic)? Only called with p_drop > 0.
__device__ __forceinline__ bool kept(const Params& p, int bh, int i, int j) {
  const uint32_t counter = static_cast<uint32_t>(dropout_counter(i, p.seq_k, j));
  return dropout_keep(p.seed + static_cast<uint64_t>(bh), counter, j, dropout_least(p.p_drop));
}

// kept() for keys j and j + 1 (j even, so both in one draw's group): one Philox draw for both,
// as the accumulator layouts hold such pairs in one thread.
__device__ __forceinline__ void kept2(const Params& p, int bh, int i, int j, bool (&keep)[2]) {
  const uint32_t counter = static_cast<uint32_t>(dropout_counter(i, p.seq_k, j));
  uint32_t w[4];
  philox4x32(p.seed + static_cast<uint64_t>(bh), counter, w);
  const uint32_t least = dropout_least(p.p_drop);
  const bool high = (j & 2) != 0;  // words 2 and 3, else 0 and 1
  keep[0] = (high ? w[2] : w[0]) >= least;
  keep[1] = (high ? w[3] : w[1]) >= least;
}

// A row's max or sum over the four lanes of a quad: in the mma.sync and wgmma accumulator
// layouts alike, a row's columns are spread over a quad.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

struct Seq {
  int64_t q0, k0;  // first row of the sequence in q / k (packed), else 0
  int len_q, len_k;
};

__device__ __forceinline__ Seq seq_of(const Params& p, int b) {
  if (p.cu_q) return {p.cu_q[b], p.cu_k[b], p.cu_q[b + 1] - p.cu_q[b], p.cu_k[b + 1] - p.cu_k[b]};
  return {0, 0, p.seq_q, p.seq_k};
}

// May query i attend key j (both relative to their sequence)? Causal is aligned bottom-right.
__device__ __forceinline__ bool allowed(const Params& p, int b, const Seq& s, int i, int j) {
  if (i >= s.len_q || j >= s.len_k) return false;
  if (p.causal && j > i + (s.len_k - s.len_q)) return false;
  return !p.key_mask || p.key_mask[b * p.mask_b + j] != 0;
}

// The keys [0, end) that query rows [m0, m0 + rows) may see: causal stops at the last row's
// diagonal.
__device__ __forceinline__ int keys_end(const Params& p, const Seq& s, int m0, int rows) {
  return p.causal ? min(s.len_k, m0 + rows + s.len_k - s.len_q) : s.len_k;
}

// The first query that may see key n0 (causal), rounded down to a multiple of `rows`.
__device__ __forceinline__ int first_query(const Params& p, const Seq& s, int n0, int rows) {
  return p.causal ? max(0, n0 - (s.len_k - s.len_q)) / rows * rows : 0;
}

// ---- host side ----------------------------------------------------------------------------

inline Operand operand(const TensorView& t, bool varlen) {
  return {t.data, varlen ? 0 : t.stride[0], t.stride[varlen ? 0 : 1], t.stride[varlen ? 1 : 2]};
}

// Can every row of t be copied in 16-byte pieces (2-byte elements: pointer and strides)?
inline bool aligned16(const Operand& t) {
  return reinterpret_cast<std::uintptr_t>(t.p) % 16 == 0 && t.b % 8 == 0 && t.s % 8 == 0 && t.h % 8 == 0;
}

inline Params params_of(const Problem& pr) {
  Params p{};
  const bool varlen = pr.cu_q.has_value();
  p.q = operand(pr.q, varlen);
  p.k = operand(pr.k, varlen);
  p.v = operand(pr.v, varlen);
  p.key_mask = pr.key_mask ? static_cast<const int8_t*>(pr.key_mask->data) : nullptr;
  p.mask_b = pr.key_mask ? pr.key_mask->stride[0] : 0;
  p.cu_q = varlen ? static_cast<const int*>(pr.cu_q->data) : nullptr;
  p.cu_k = varlen ? static_cast<const int*>(pr.cu_k->data) : nullptr;
  const int hd = varlen ? 1 : 2;
  const int64_t heads = pr.q.shape[hd];
  p.heads = static_cast<int>(heads);
  p.group = static_cast<int>(heads / pr.k.shape[hd]);
  p.p_drop = pr.dropout_p;
  p.keep_scale = 1.0f / (1.0f - pr.dropout_p);
  p.seed = pr.seed;
  p.seq_q = static_cast<int>(pr.max_q);
  p.seq_k = static_cast<int>(pr.max_k);
  p.lse_b = varlen ? 0 : heads * pr.q.shape[1];
  p.lse_h = varlen ? pr.q.shape[0] : pr.q.shape[1];
  p.causal = pr.causal;
  p.scale = pr.scale;
  p.scale2 = pr.scale * kLog2e;
  return p;
}

inline int batch_of(const Problem& pr) {
  return static_cast<int>(pr.cu_q ? pr.cu_q->shape[0] - 1 : pr.q.shape[0]);
}

// The Hopper kernels (attention_hopper.cu): why they cannot serve a call ("" when they can;
// `backward` checks dout, dq, dk, dv, else out), and their launchers.
std::string wgmma_unavailable(const Problem& pr, const Params& p, bool backward);
void launch_forward_wgmma(const Problem& pr, const Params& p, std::uintptr_t stream);
void launch_backward_wgmma(const Problem& pr, const Params& p, std::uintptr_t stream);

}  // namespace fusedlm::attention::detail

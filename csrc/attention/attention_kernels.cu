// Flash attention forward and backward on tensor cores through mma.sync (m16n8k16 fp16/bf16 in,
// fp32 accumulation; ../common/warp_mma.cuh), templated over the storage dtype and the head dim.
// Runs on sm_80 and later (sm_90a included; the Hopper kernels with wgmma and TMA are
// attention_hopper.cu, opt-in). One CTA of four warps owns a 64-row block, each warp 16 of its
// rows, whose products stay in registers, FlashAttention-2's arrangement: S = Q K^T accumulates
// in registers, the online softmax (base 2) runs there, and P becomes the A operand of P V
// without leaving them. Tiles come in through 16-byte cp.async copies when the operands
// are 16-byte aligned, the next key (or query) block's while this one's products run.
//
// Forward: per query block, over the key blocks it sees. Backward: dK/dV per key block (over
// the group's query heads and the query blocks that see it) and dQ per query block (over the
// key blocks), each accumulating in registers: no atomics, deterministic results.
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../common/async_copy.cuh"
#include "../common/cuda_math.cuh"
#include "../common/cuda_runtime.h"
#include "../common/dtype_dispatch.h"
#include "../common/launch.cuh"
#include "../common/warp_mma.cuh"
#include "attention.h"
#include "attention_device.cuh"

namespace fusedlm::attention {
namespace {

using namespace detail;
using math::from_float;
using math::to_float;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// Kernels are declared __launch_bounds__(kThreads, 1), which lets ptxas use up to 255 registers a
// thread: each warp holds a 16-row strip of S (and dP) beside its accumulators, 150-255
// registers with no spill (benchmarks/kernel_facts.py), so two CTAs fit an SM's registers, and
// their 20-70 KB of shared memory fits two on an A100 or H100 and one within the 99 KB a block
// may have on sm_86/sm_89.
constexpr int kBlock = 64;  // rows of a query or key block (both)
constexpr int kPad = 8;     // elements of padding per shared-memory row (bank spread)

// rows [r0, r0 + kRows) of a sequence's (len, D) matrix into shared memory (pitch D + kPad),
// zeros past its end, by a CTA of kCta threads. With `vec`, 16-byte cp.async copies (all in
// flight at once, zero-filled past the end; the caller commits them with tile_commit and waits
// with tile_wait); else one element per load.
template <typename T, int D, int kRows = kBlock, int kCta = kThreads>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row_stride, int r0, int len,
                                          bool vec) {
#ifdef FUSEDLM_CP_ASYNC
  if (vec) {
    constexpr int kVec = 16 / sizeof(T), kPerRow = D / kVec;
    static_assert(kRows * kPerRow % kCta == 0, "tile chunks must split evenly over the CTA");
#pragma unroll
    for (int it = 0; it < kRows * kPerRow / kCta; ++it) {
      const int i = it * kCta + threadIdx.x;
      const int r = i / kPerRow, c = i % kPerRow * kVec;
      const bool in = r0 + r < len;
      const T* g = in ? src + (r0 + r) * row_stride + c : src;  // a valid address even when unread
      cp_async_16(dst + r * (D + kPad) + c, g, in);
    }
    return;
  }
#endif
  for (int i = threadIdx.x; i < kRows * D; i += kCta) {
    const int r = i / D, c = i % D;
    dst[r * (D + kPad) + c] = r0 + r < len ? src[(r0 + r) * row_stride + c] : from_float<T>(0.0f);
  }
}

// Closes a group of tile copies (a no-op for element loads, which are done when issued).
__device__ __forceinline__ void tile_commit() {
#ifdef FUSEDLM_CP_ASYNC
  cp_async_commit();
#endif
}

// Waits for this thread's committed tile copies but the kPending most recent groups; a
// __syncthreads must follow before others read them.
template <int kPending = 0>
__device__ __forceinline__ void tile_wait() {
#ifdef FUSEDLM_CP_ASYNC
  cp_async_wait_group<kPending>();
#endif
}

// ---- register-tile products (mma.sync; warp_mma.cuh gives the fragment layouts) ------------
// A warp's 16 rows: an fp32 accumulator of N columns is float[N / 8][4] (tile j, entry e: row
// g + 8 (e / 2), column 8 j + 2 t + e % 2, for the lane's quad g and position t); an A operand
// of K columns is uint32_t[K / 16][4].

// a = rows [0, 16) of a shared-memory tile (pitch ld), columns [0, K).
template <typename T, int K>
__device__ __forceinline__ void load_a(uint32_t (&a)[K / 16][4], const T* tile, int ld) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) mma::ldmatrix_x4<false>(a[kk], tile + (lane % 16) * ld + kk * 16 + lane / 16 * 8);
}

// Where a product's A operand (16 x K) comes from: registers loaded once (RegsA), or 16 rows of
// a shared-memory tile read at each use (SmemA: no registers held across products).
template <int K>
struct RegsA {
  const uint32_t (&x)[K / 16][4];
  __device__ __forceinline__ void frag(int kk, uint32_t (&r)[4]) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) r[i] = x[kk][i];
  }
};

template <typename T>
struct SmemA {
  const T* tile;
  int ld;
  __device__ __forceinline__ void frag(int kk, uint32_t (&r)[4]) const {
    const int lane = threadIdx.x % 32;
    mma::ldmatrix_x4<false>(r, tile + (lane % 16) * ld + kk * 16 + lane / 16 * 8);
  }
};

// acc (16 x N) += a (16 x K) times bt^T, where bt holds N rows of K columns (pitch ld): S = Q K^T.
template <typename T, int K, int N, typename A>
__device__ __forceinline__ void gemm_bt(float (&acc)[N / 8][4], const A& a, const T* bt, int ld) {
  static_assert(K % 32 == 0, "an ldmatrix .x4 covers 32 columns of one 8-row tile");
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kk = 0; kk < K / 32; ++kk) {
    uint32_t a0[4], a1[4];
    a.frag(2 * kk, a0);
    a.frag(2 * kk + 1, a1);
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
      uint32_t r[4];
      mma::ldmatrix_x4<false>(r, bt + (8 * j + lane % 8) * ld + kk * 32 + lane / 8 * 8);
      mma::mma_16816<T>(acc[j], a0, {r[0], r[1]});
      mma::mma_16816<T>(acc[j], a1, {r[2], r[3]});
    }
  }
}

// acc (16 x N) += a (16 x K) times b, where b holds K rows of N columns (pitch ld): O += P V.
template <typename T, int K, int N>
__device__ __forceinline__ void gemm_b(float (&acc)[N / 8][4], const uint32_t (&a)[K / 16][4], const T* b, int ld) {
  static_assert(N % 16 == 0, "a transposed ldmatrix .x4 covers 16 columns");
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk)
#pragma unroll
    for (int j = 0; j < N / 16; ++j) {
      uint32_t r[4];
      mma::ldmatrix_x4<true>(r, b + (16 * kk + lane % 16) * ld + 16 * j + lane / 16 * 8);
      mma::mma_16816<T>(acc[2 * j], a[kk], {r[0], r[1]});
      mma::mma_16816<T>(acc[2 * j + 1], a[kk], {r[2], r[3]});
    }
}

// The accumulator, rounded to T, as the A operand of the next product (P for P V): the two
// layouts put the same elements in the same lanes.
template <typename T, int N>
__device__ __forceinline__ void to_a(uint32_t (&a)[N / 16][4], const float (&acc)[N / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    a[kk][0] = mma::pack<T>(acc[2 * kk][0], acc[2 * kk][1]);
    a[kk][1] = mma::pack<T>(acc[2 * kk][2], acc[2 * kk][3]);
    a[kk][2] = mma::pack<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    a[kk][3] = mma::pack<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
  }
}

// Writes a warp's 16 x N accumulator (times `mul`) to rows [r0, r0 + 16) of out, through its 16
// rows of a shared-memory tile (pitch ld, this warp's alone) so that each row leaves in 16-byte
// stores (with `vec`, else one element at a time); rows at or past `len` are skipped.
template <typename T, int N>
__device__ __forceinline__ void store_acc(const float (&acc)[N / 8][4], float mul, T* stage, int ld, T* out,
                                          int64_t row_stride, int r0, int len, bool vec) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int j = 0; j < N / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) stage[(g + 8 * (e / 2)) * ld + 8 * j + 2 * t + e % 2] = from_float<T>(acc[j][e] * mul);
  __syncwarp();
  constexpr int kVec = 16 / sizeof(T);
  using Chunk = math::Pack<T, kVec>;
  if (vec) {
    for (int i = lane; i < 16 * N / kVec; i += 32) {
      const int r = i / (N / kVec), c = i % (N / kVec) * kVec;
      if (r0 + r < len)
        *reinterpret_cast<Chunk*>(out + (r0 + r) * row_stride + c) = *reinterpret_cast<const Chunk*>(stage + r * ld + c);
    }
  } else {
    for (int i = lane; i < 16 * N; i += 32) {
      const int r = i / N, c = i % N;
      if (r0 + r < len) out[(r0 + r) * row_stride + c] = stage[r * ld + c];
    }
  }
  __syncwarp();
}

// Shared-memory tiles of the storage dtype, pitch D + kPad (ldmatrix's eight 16-byte rows then
// fall in eight different bank groups): kBig tiles of kBlock rows, then kSmall of kSmallRows
// (the backward's stepped operands: only the rows a step uses take shared memory).
template <typename T, int D, int kBig, int kSmall = 0, int kSmallRows = kBlock>
struct Tiles {
  static constexpr int LD = D + kPad;
  static constexpr int kBytes = (kBig * kBlock + kSmall * kSmallRows) * LD * int(sizeof(T));
  unsigned char* base;
  // Tile i; i = kBig + kSmall is where the tiles end.
  __device__ T* tile(int i) const {
    return reinterpret_cast<T*>(base) + (i < kBig ? i * kBlock : kBig * kBlock + (i - kBig) * kSmallRows) * LD;
  }
};

// Does key block [n0, n0 + kKeys) need the mask rules for query rows from m0 on? Not
// when every pair is allowed: no key mask, all keys inside the sequence, and (causal) the
// block's last key at or below the first row's diagonal. (Rows past the sequence's end are
// computed from zeros and never stored.)
template <int kKeys = kBlock>
__device__ __forceinline__ bool partial_block(const Params& p, const Seq& s, int m0, int n0) {
  return p.key_mask || n0 + kKeys > s.len_k || (p.causal && n0 + kKeys - 1 > m0 + (s.len_k - s.len_q));
}

// The query block of a forward or dQ CTA. Causal, the last blocks see the most keys: they get
// the first CTAs, so that the longest ones do not start last and leave the GPU idle at the end.
__device__ __forceinline__ int query_block(const Params& p) {
  return p.causal ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : static_cast<int>(blockIdx.x);
}

// The top of key-block iteration `it` of the forward and dQ, whose K and V tiles for block i are
// first + 2 (i % 2) and the one after: once every warp is done with the other pair (read in the
// previous iteration), block it + 1's copies go there and stay in flight while block it's land
// and become visible to the CTA.
template <typename T, int D, int kKeys, typename L>
__device__ __forceinline__ void key_block_ready(const L& sm, int first, int it, int n_blocks, const T* k, const T* v,
                                                const Params& p, const Seq& s) {
  __syncthreads();
  if (it + 1 < n_blocks) {
    const int next = first + 2 * ((it + 1) % 2), n1 = (it + 1) * kKeys;
    load_tile<T, D, kKeys>(sm.tile(next), k, p.k.s, n1, s.len_k, p.vec);
    load_tile<T, D, kKeys>(sm.tile(next + 1), v, p.v.s, n1, s.len_k, p.vec);
    tile_commit();
    tile_wait<1>();
  } else {
    tile_wait<0>();
  }
  __syncthreads();
}

// The forward's key block: 64 keys, 32 at head dim 128 (with 64, its S tile beside the 16 x 128
// O accumulator left ptxas no register to spare: any change spilled).
template <int D>
constexpr int kFwdKeys = D > 96 ? 32 : kBlock;

// Q, then K and V twice over (kFwdKeys rows each): the next key block's copies are in flight
// while this one's products run.
template <typename T, int D>
using FwdSmem = Tiles<T, D, 1, 4, kFwdKeys<D>>;

// One CTA per (64-row query block, head, batch): each warp owns 16 rows, their S, P and O in
// registers (Q is read from shared memory at each product). The online softmax works in base 2
// on rows spread over the lane quads.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_kernel(Params p) {
  using L = FwdSmem<T, D>;
  constexpr int LD = L::LD, kKeys = kFwdKeys<D>;
  const L sm{dynamic_smem()};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int b = blockIdx.z, h = blockIdx.y, m0 = query_block(p) * kBlock;
  const Seq s = seq_of(p, b);
  if (m0 >= s.len_q) return;
  const int hk = h / p.group;
  const T* k = rows<const T>(p.k, b, s.k0, hk);
  const T* v = rows<const T>(p.v, b, s.k0, hk);
  T* sQ = sm.tile(0);
  const int n_blocks = (keys_end(p, s, m0, kBlock) + kKeys - 1) / kKeys;

  load_tile<T, D>(sQ, rows<const T>(p.q, b, s.q0, h), p.q.s, m0, s.len_q, p.vec);
  tile_commit();
  if (n_blocks > 0) {
    load_tile<T, D, kKeys>(sm.tile(1), k, p.k.s, 0, s.len_k, p.vec);
    load_tile<T, D, kKeys>(sm.tile(2), v, p.v.s, 0, s.len_k, p.vec);
  }
  tile_commit();
  tile_wait<1>();  // Q
  __syncthreads();
  // Q is read from shared memory at each product: held in registers, its 2 D of them left
  // ptxas too few at D = 128 (sm_90a spilled).
  const SmemA<T> qa{sQ + warp * 16 * LD, LD};

  float o[D / 8][4] = {};
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.0f, 0.0f};  // rows g and g + 8; l: this lane's share
  const int row0 = m0 + warp * 16 + g;
  for (int it = 0; it < n_blocks; ++it) {
    const int n0 = it * kKeys;
    const T *sK = sm.tile(1 + 2 * (it % 2)), *sV = sm.tile(2 + 2 * (it % 2));
    key_block_ready<T, D, kKeys>(sm, 1, it, n_blocks, k, v, p, s);
    float sc[kKeys / 8][4] = {};
    gemm_bt<T, D, kKeys>(sc, qa, sK, LD);  // S = Q K^T

    const bool partial = partial_block<kKeys>(p, s, m0, n0);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n0 + 8 * j + 2 * t + e % 2;
        const bool ok = !partial || allowed(p, b, s, row0 + 8 * (e / 2), col);
        sc[j][e] = ok ? sc[j][e] * p.scale2 : -INFINITY;
        mx[e / 2] = fmaxf(mx[e / 2], sc[j][e]);
      }
    float alpha[2], m_new[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the row's max over its quad
      mx[r] = quad_max(mx[r]);
      m_new[r] = fmaxf(m_i[r], mx[r]);
      // Nothing allowed yet: keep m at -inf, add zeros (no inf - inf).
      alpha[r] = m_new[r] == -INFINITY ? 1.0f : exp2f(m_i[r] - m_new[r]);
      m_i[r] = m_new[r];
      l_i[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        const float pv = m_new[r] == -INFINITY ? 0.0f : exp2f(sc[j][e] - m_new[r]);
        l_i[r] += pv;  // the normalizer sums every probability, dropped or not
        float kept_pv = pv;
        if (p.p_drop > 0.0f)
          kept_pv = kept(p, b * p.heads + h, row0 + 8 * r, n0 + 8 * j + 2 * t + e % 2) ? pv * p.keep_scale : 0.0f;
        sc[j][e] = kept_pv;
      }
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[j][e] *= alpha[e / 2];
    uint32_t pa[kKeys / 16][4];
    to_a<T, kKeys>(pa, sc);
    gemm_b<T, kKeys, D>(o, pa, sV, LD);  // O += P V
  }
  tile_wait<0>();  // the (empty) copies, when no key block was visited
#pragma unroll
  for (int r = 0; r < 2; ++r) l_i[r] = quad_sum(l_i[r]);  // the row's normalizer over its quad
  // A row that saw no key gives zeros. l_i >= 1 (the row max contributes 1): the fast
  // reciprocal is exact enough and calls no slow-path routine.
  const float inv[2] = {l_i[0] > 0.0f ? __fdividef(1.0f, l_i[0]) : 0.0f, l_i[1] > 0.0f ? __fdividef(1.0f, l_i[1]) : 0.0f};
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[j][e] *= inv[e / 2];
  // Through this warp's own rows of the Q tile, which only it read.
  store_acc<T, D>(o, 1.0f, sQ + warp * 16 * LD, LD, rows<T>(p.o, b, s.q0, h), p.o.s, m0 + warp * 16, s.len_q,
                  p.vec_out);
  // +inf for a row that saw no key, as the Triton kernel writes it: exp2(s - lse) is then 0.
#pragma unroll
  for (int r = 0; r < 2; ++r)
    if (t == 0 && row0 + 8 * r < s.len_q)
      p.lse[b * p.lse_b + h * p.lse_h + s.q0 + row0 + 8 * r] = l_i[r] > 0.0f ? m_i[r] + log2f(l_i[r]) : INFINITY;
}

// The backward kernels step through the other operand kStep rows at a time (queries for dK/dV,
// keys for dQ), half the forward's: with 64, the S and dP tiles beside a 16 x D accumulator
// left ptxas too few registers and it spilled at D >= 64. dK/dV, with two accumulators, take
// 16 at D = 128 (32 spilled 72 bytes there).
constexpr int kStep = 32;
template <int D>
constexpr int kDkdvStep = D > 96 ? 16 : kStep;

// K, V; Q and dO twice over (kDkdvStep rows each), as the forward's K and V; then the
// log-sum-exp and delta of the query rows in them.
template <typename T, int D>
struct DkdvSmem : Tiles<T, D, 2, 4, kDkdvStep<D>> {
  static constexpr int kBytes = Tiles<T, D, 2, 4, kDkdvStep<D>>::kBytes + 2 * 2 * kDkdvStep<D> * 4;
  __device__ float* lse(int buf) const { return reinterpret_cast<float*>(this->tile(6)) + buf * kDkdvStep<D>; }
  __device__ float* delta(int buf) const { return lse(2) + buf * kDkdvStep<D>; }
};

// dK, dV for one 64-key block of one key/value head: loops over the query heads of its group and
// over the kDkdvStep-row query blocks that can see it. Each warp owns 16 keys: S^T and dP^T,
// P^T and dS^T, and its dK and dV accumulators, all in registers; K and V are read from shared
// memory at each product (held in registers too, they would not leave ptxas enough at D = 128).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dkdv_kernel(Params p) {
  using L = DkdvSmem<T, D>;
  constexpr int LD = L::LD, kStep = kDkdvStep<D>;
  const L sm{dynamic_smem()};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int b = blockIdx.z, hk = blockIdx.y, n0 = blockIdx.x * kBlock;
  const Seq s = seq_of(p, b);
  if (n0 >= s.len_k) return;
  T *sK = sm.tile(0), *sV = sm.tile(1);
  const int m_start = first_query(p, s, n0, kStep);
  const int m_blocks = (s.len_q - m_start + kStep - 1) / kStep, steps = p.group * m_blocks;
  // Step i: query head hk * group + i / m_blocks, block m_start + (i % m_blocks) * kStep, into
  // buffer i % 2 (Q: tile 2 + buf, dO: tile 4 + buf).
  auto load_step = [&](int i) {
    const int h = hk * p.group + i / m_blocks, m0 = m_start + i % m_blocks * kStep, buf = i % 2;
    load_tile<T, D, kStep>(sm.tile(2 + buf), rows<const T>(p.q, b, s.q0, h), p.q.s, m0, s.len_q, p.vec);
    load_tile<T, D, kStep>(sm.tile(4 + buf), rows<const T>(p.dout, b, s.q0, h), p.dout.s, m0, s.len_q, p.vec);
    const int64_t at = b * p.lse_b + h * p.lse_h + s.q0;
    for (int c = threadIdx.x; c < kStep; c += kThreads) {
      const bool in = m0 + c < s.len_q;
      sm.lse(buf)[c] = in ? p.lse[at + m0 + c] : INFINITY;
      sm.delta(buf)[c] = in ? p.delta[at + m0 + c] : 0.0f;
    }
  };
  load_tile<T, D>(sK, rows<const T>(p.k, b, s.k0, hk), p.k.s, n0, s.len_k, p.vec);
  load_tile<T, D>(sV, rows<const T>(p.v, b, s.k0, hk), p.v.s, n0, s.len_k, p.vec);
  if (steps > 0) load_step(0);
  tile_commit();

  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  const SmemA<T> ka{sK + warp * 16 * LD, LD}, va{sV + warp * 16 * LD, LD};
  const int key0 = n0 + warp * 16 + g;  // this lane's keys: key0 and key0 + 8
  for (int i = 0; i < steps; ++i) {
    const int h = hk * p.group + i / m_blocks, m0 = m_start + i % m_blocks * kStep, buf = i % 2;
    const T *sQ = sm.tile(2 + buf), *sdO = sm.tile(4 + buf);
    const float *sL = sm.lse(buf), *sDelta = sm.delta(buf);
    __syncthreads();  // the other buffers, read in the previous step, are free
    if (i + 1 < steps) {
      load_step(i + 1);
      tile_commit();
      tile_wait<1>();
    } else {
      tile_wait<0>();
    }
    __syncthreads();
    float st[kStep / 8][4] = {}, dpt[kStep / 8][4] = {};
    gemm_bt<T, D, kStep>(st, ka, sQ, LD);    // S^T = K Q^T
    gemm_bt<T, D, kStep>(dpt, va, sdO, LD);  // dP^T = V dO^T
    const bool partial = partial_block(p, s, m0, n0);
#pragma unroll
    for (int j = 0; j < kStep / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = 8 * j + 2 * t + e % 2, kj = key0 + 8 * (e / 2);  // query m0 + c, key kj
        const bool ok = (!partial || allowed(p, b, s, m0 + c, kj)) && sL[c] != INFINITY;
        const float pt = ok ? exp2f(st[j][e] * p.scale2 - sL[c]) : 0.0f;
        float dp = dpt[j][e], pt_kept = pt;
        if (p.p_drop > 0.0f) {
          const bool keep = kept(p, b * p.heads + h, m0 + c, kj);
          pt_kept = keep ? pt * p.keep_scale : 0.0f;
          dp = keep ? dp * p.keep_scale : 0.0f;
        }
        st[j][e] = pt_kept;
        dpt[j][e] = pt * (dp - sDelta[c]);  // dS^T
      }
    uint32_t pa[kStep / 16][4], dsa[kStep / 16][4];
    to_a<T, kStep>(pa, st);
    to_a<T, kStep>(dsa, dpt);
    gemm_b<T, kStep, D>(dv, pa, sdO, LD);  // dV += P^T dO
    gemm_b<T, kStep, D>(dk, dsa, sQ, LD);  // dK += dS^T Q
  }
  tile_wait<0>();  // the K and V copies, when no query block was visited
  __syncthreads();  // ... which every warp must see landed before its own rows are overwritten
  // Through this warp's own rows of the K and V tiles, which only it read.
  store_acc<T, D>(dk, p.scale, sK + warp * 16 * LD, LD, rows<T>(p.dk, b, s.k0, hk), p.dk.s, n0 + warp * 16, s.len_k,
                  p.vec_out);
  store_acc<T, D>(dv, 1.0f, sV + warp * 16 * LD, LD, rows<T>(p.dv, b, s.k0, hk), p.dv.s, n0 + warp * 16, s.len_k,
                  p.vec_out);
}

// delta = rowsum(dO * O) for every query row, laid out like the log-sum-exp: what both backward
// kernels (mma.sync and wgmma) read. One warp per (row, head), a lane per D / 32 values.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_delta_kernel(Params p) {
  const int b = blockIdx.z, h = blockIdx.y, lane = threadIdx.x % 32;
  const int i = blockIdx.x * kWarps + threadIdx.x / 32;
  const Seq s = seq_of(p, b);
  if (i >= s.len_q) return;
  const T* o = rows<const T>(p.o, b, s.q0 + i, h);
  const T* d = rows<const T>(p.dout, b, s.q0 + i, h);
  float acc = 0.0f;
#pragma unroll
  for (int c = lane; c < D; c += 32) acc += to_float(o[c]) * to_float(d[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.delta[b * p.lse_b + h * p.lse_h + s.q0 + i] = acc;
}

// Q and dO; K and V twice over (kStep rows each).
template <typename T, int D>
using DqSmem = Tiles<T, D, 2, 4, kStep>;

// dQ for one 64-row query block of one head: loops over the kStep-key blocks it sees. Each warp
// owns 16 rows: S, dP, dS and the dQ accumulator in registers; Q and dO are read from shared
// memory at each product (in registers, they left ptxas too few).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dq_kernel(Params p) {
  using L = DqSmem<T, D>;
  constexpr int LD = L::LD;
  const L sm{dynamic_smem()};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int b = blockIdx.z, h = blockIdx.y, m0 = query_block(p) * kBlock;
  const Seq s = seq_of(p, b);
  if (m0 >= s.len_q) return;
  const int hk = h / p.group;
  const T* k = rows<const T>(p.k, b, s.k0, hk);
  const T* v = rows<const T>(p.v, b, s.k0, hk);
  T *sQ = sm.tile(0), *sdO = sm.tile(1);
  const int n_blocks = (keys_end(p, s, m0, kBlock) + kStep - 1) / kStep;
  load_tile<T, D>(sQ, rows<const T>(p.q, b, s.q0, h), p.q.s, m0, s.len_q, p.vec);
  load_tile<T, D>(sdO, rows<const T>(p.dout, b, s.q0, h), p.dout.s, m0, s.len_q, p.vec);
  tile_commit();
  if (n_blocks > 0) {
    load_tile<T, D, kStep>(sm.tile(2), k, p.k.s, 0, s.len_k, p.vec);
    load_tile<T, D, kStep>(sm.tile(3), v, p.v.s, 0, s.len_k, p.vec);
  }
  tile_commit();
  tile_wait<1>();  // Q and dO
  __syncthreads();  // every thread's copies of them: a warp's rows are also its epilogue's stage
  const SmemA<T> qa{sQ + warp * 16 * LD, LD}, doa{sdO + warp * 16 * LD, LD};

  const int row0 = m0 + warp * 16 + g;  // this lane's rows: row0 and row0 + 8
  float lse[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t at = b * p.lse_b + h * p.lse_h + s.q0 + row0 + 8 * r;
    lse[r] = row0 + 8 * r < s.len_q ? p.lse[at] : INFINITY;
    delta[r] = row0 + 8 * r < s.len_q ? p.delta[at] : 0.0f;
  }
  float dq[D / 8][4] = {};
  for (int it = 0; it < n_blocks; ++it) {
    const int n0 = it * kStep;
    const T *sK = sm.tile(2 + 2 * (it % 2)), *sV = sm.tile(3 + 2 * (it % 2));
    key_block_ready<T, D, kStep>(sm, 2, it, n_blocks, k, v, p, s);
    float sc[kStep / 8][4] = {}, dp[kStep / 8][4] = {};
    gemm_bt<T, D, kStep>(sc, qa, sK, LD);   // S = Q K^T
    gemm_bt<T, D, kStep>(dp, doa, sV, LD);  // dP = dO V^T
    const bool partial = partial_block<kStep>(p, s, m0, n0);
#pragma unroll
    for (int j = 0; j < kStep / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, col = n0 + 8 * j + 2 * t + e % 2;
        const bool ok = (!partial || allowed(p, b, s, row0 + 8 * r, col)) && lse[r] != INFINITY;
        const float pv = ok ? exp2f(sc[j][e] * p.scale2 - lse[r]) : 0.0f;
        float d = dp[j][e];
        if (p.p_drop > 0.0f) d = kept(p, b * p.heads + h, row0 + 8 * r, col) ? d * p.keep_scale : 0.0f;
        sc[j][e] = pv * (d - delta[r]);  // dS
      }
    uint32_t dsa[kStep / 16][4];
    to_a<T, kStep>(dsa, sc);
    gemm_b<T, kStep, D>(dq, dsa, sK, LD);  // dQ += dS K
  }
  tile_wait<0>();  // the (empty) copies, when no key block was visited
  // Through this warp's own rows of the Q tile, which only it read.
  store_acc<T, D>(dq, p.scale, sQ + warp * 16 * LD, LD, rows<T>(p.dq, b, s.q0, h), p.dq.s, m0 + warp * 16, s.len_q,
                  p.vec_out);
}

// ---- host side ----------------------------------------------------------------------------

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, int smem, const Params& p, cudaStream_t stream, int threads = kThreads) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "cudaFuncSetAttribute (attention shared memory)");
  launch_kernel(kernel, grid, threads, smem, stream, "attention kernel launch", p);
}

unsigned blocks(int64_t n) { return static_cast<unsigned>((n + kBlock - 1) / kBlock); }

struct Forward {
  template <typename T, int D>
  static void run(const Problem& pr, const Params& p, cudaStream_t st) {
    const int hd = pr.cu_q ? 1 : 2;
    launch(attention_fwd_kernel<T, D>, dim3(blocks(pr.max_q), pr.q.shape[hd], batch_of(pr)),
           FwdSmem<T, D>::kBytes, p, st);
  }
};

struct Delta {
  template <typename T, int D>
  static void run(const Problem& pr, const Params& p, cudaStream_t st) {
    const int hd = pr.cu_q ? 1 : 2;
    const unsigned row_blocks = static_cast<unsigned>((pr.max_q + kWarps - 1) / kWarps);
    launch(attention_bwd_delta_kernel<T, D>, dim3(row_blocks, pr.q.shape[hd], batch_of(pr)), 0, p,
           st);
  }
};

struct Backward {
  template <typename T, int D>
  static void run(const Problem& pr, const Params& p, cudaStream_t st) {
    const int hd = pr.cu_q ? 1 : 2;
    launch(attention_bwd_dkdv_kernel<T, D>, dim3(blocks(pr.max_k), pr.k.shape[hd], batch_of(pr)),
           DkdvSmem<T, D>::kBytes, p, st);
    launch(attention_bwd_dq_kernel<T, D>, dim3(blocks(pr.max_q), pr.q.shape[hd], batch_of(pr)),
           DqSmem<T, D>::kBytes, p, st);
  }
};

template <typename Launcher>
void dispatch(const Problem& pr, const Params& p, std::uintptr_t stream) {
  DeviceGuard guard(pr.q.device_id);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int64_t d = pr.q.shape[pr.q.ndim - 1];
  with_half_type(pr.q.dtype, "the CUDA C++ attention", [&](auto t) {
    using T = decltype(t);
    switch (d) {  // kHeadDims
      case 32: return Launcher::template run<T, 32>(pr, p, st);
      case 64: return Launcher::template run<T, 64>(pr, p, st);
      case 96: return Launcher::template run<T, 96>(pr, p, st);
      case 128: return Launcher::template run<T, 128>(pr, p, st);
      default: throw ArgError("unsupported head dim " + std::to_string(d));
    }
  });
}

// With `wgmma`, the Hopper kernels where they can serve the call, else the mma.sync ones; returns
// which ran ("wgmma", "mma" or "mma (wgmma declined: <why>)").
template <typename Launcher>
std::string run_preferring_wgmma(const Problem& pr, const Params& p, bool wgmma, std::uintptr_t stream) {
  constexpr bool kBackward = std::is_same<Launcher, Backward>::value;
  std::string declined;
  if (wgmma) {
    declined = wgmma_unavailable(pr, p, kBackward);
    if (declined.empty()) {
      kBackward ? launch_backward_wgmma(pr, p, stream) : launch_forward_wgmma(pr, p, stream);
      return "wgmma";
    }
  }
  dispatch<Launcher>(pr, p, stream);
  return declined.empty() ? "mma" : "mma (wgmma declined: " + declined + ")";
}

}  // namespace

std::string launch_forward(const ForwardArgs& a, std::uintptr_t stream) {
  Params p = params_of(a.p);
  p.o = operand(a.o, a.p.cu_q.has_value());
  p.lse = static_cast<float*>(a.lse.data);
  p.vec = aligned16(p.q) && aligned16(p.k) && aligned16(p.v);
  p.vec_out = aligned16(p.o);
  return run_preferring_wgmma<Forward>(a.p, p, a.wgmma, stream);
}

std::string launch_backward(const BackwardArgs& a, std::uintptr_t stream) {
  Params p = params_of(a.p);
  const bool varlen = a.p.cu_q.has_value();
  p.dout = operand(a.dout, varlen);
  p.dq = operand(a.dq, varlen);
  p.dk = operand(a.dk, varlen);
  p.dv = operand(a.dv, varlen);
  p.o = operand(a.o, varlen);
  p.lse = static_cast<float*>(a.lse.data);
  p.delta = static_cast<float*>(a.delta.data);
  p.vec = aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.dout);
  p.vec_out = aligned16(p.dq) && aligned16(p.dk) && aligned16(p.dv);
  dispatch<Delta>(a.p, p, stream);  // for whichever kernels run next
  return run_preferring_wgmma<Backward>(a.p, p, a.wgmma, stream);
}

}  // namespace fusedlm::attention

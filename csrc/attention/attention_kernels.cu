// Flash attention forward and backward on tensor cores through WMMA (16x16x16 fp16/bf16 tiles,
// fp32 accumulation), templated over the storage dtype and the head dim. Runs on sm_80 and
// later (sm_90a included, through the same mma instructions; the Hopper kernels with wgmma and
// TMA are attention_hopper.cu, opt-in). One CTA owns a 64-row block: four warps, each owning 16
// of its rows (eight for dK/dV, two per 16 rows). Tiles come in through 16-byte cp.async copies
// when the operands are 16-byte aligned.
//
// Forward (per query block): for each key block, S = Q K^T on tensor cores into shared memory,
// the online softmax in base 2 (two lanes per row), P rounded to the storage dtype, O += P V,
// with O kept in fp32 shared memory so that it can be rescaled row by row.
// Backward: dK/dV per key block (looping over the group's query heads and the query blocks; the
// accumulators stay in registers) and dQ per query block. No atomics: results are deterministic.
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../common/async_copy.cuh"
#include "../common/cuda_math.cuh"
#include "../common/cuda_runtime.h"
#include "../common/dtype_dispatch.h"
#include "../common/launch.cuh"
#include "attention.h"
#include "attention_device.cuh"

namespace fusedlm::attention {
namespace {

using namespace nvcuda;
using namespace detail;
using math::from_float;
using math::to_float;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// Kernels are declared __launch_bounds__(kThreads, 1): their 40-110 KB of shared memory allows
// only 1-3 CTAs an SM, and without the bound ptxas spilled to reach register counts (56-168)
// meant for an occupancy the shared memory rules out (nvcc -Xptxas -v).
constexpr int kBlock = 64;  // rows of a query or key block (both)
constexpr int kPad = 8;     // elements of padding per shared-memory row (bank spread)

// rows [r0, r0 + kBlock) of a sequence's (len, D) matrix into shared memory (pitch D + kPad),
// zeros past its end, by a CTA of kCta threads. With `vec`, 16-byte cp.async copies (all in
// flight at once, zero-filled past the end; the caller waits with tile_wait); else one element
// per load.
template <typename T, int D, int kCta = kThreads>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row_stride, int r0, int len,
                                          bool vec) {
#ifdef FUSEDLM_CP_ASYNC
  if (vec) {
    constexpr int kVec = 16 / sizeof(T), kPerRow = D / kVec;
    static_assert(kBlock * kPerRow % kCta == 0, "tile chunks must split evenly over the CTA");
#pragma unroll
    for (int it = 0; it < kBlock * kPerRow / kCta; ++it) {
      const int i = it * kCta + threadIdx.x;
      const int r = i / kPerRow, c = i % kPerRow * kVec;
      const bool in = r0 + r < len;
      const T* g = in ? src + (r0 + r) * row_stride + c : src;  // a valid address even when unread
      cp_async_16(dst + r * (D + kPad) + c, g, in);
    }
    cp_async_commit();
    return;
  }
#endif
  for (int i = threadIdx.x; i < kBlock * D; i += kCta) {
    const int r = i / D, c = i % D;
    dst[r * (D + kPad) + c] = r0 + r < len ? src[(r0 + r) * row_stride + c] : from_float<T>(0.0f);
  }
}

// Waits for this thread's cp.async copies; a __syncthreads must follow before others read.
__device__ __forceinline__ void tile_wait() {
#ifdef FUSEDLM_CP_ASYNC
  cp_async_wait_all();
#endif
}

// The per-row loops below give two lanes one row (lane 2r + h: row r, columns [h W, h W + W)).
// Lane (r, h) visits its columns starting at offset r + 16 h: with fp32 rows whose pitch is a
// multiple of 32 words, the 32 lanes then touch 32 different banks at each step instead of one.
template <int W>
__device__ __forceinline__ int column(int half, int r, int j) {
  return half * W + (j + r + 16 * half) % W;
}

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T, typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Layout>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// out (16 x N, fp32, pitch ldo) = A (16 x K rows of a, pitch lda) times B, where B is
// (K x N): kTransB ? b holds B^T row-major (N x K, pitch ldb) : b holds B row-major. One output
// tile at a time (the n loop is not unrolled): unrolled, its fragment loads were all hoisted
// and spilled (nvcc -Xptxas -v).
template <typename T, int K, int N, bool kTransB>
__device__ __forceinline__ void warp_gemm(const T* a, int lda, const T* b, int ldb, float* out, int ldo) {
  using Layout = typename std::conditional<kTransB, wmma::col_major, wmma::row_major>::type;
#pragma unroll 1
  for (int n = 0; n < N / 16; ++n) {
    FragC acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int k = 0; k < K / 16; ++k) {
      FragA<T> fa;
      FragB<T, Layout> fb;
      wmma::load_matrix_sync(fa, a + k * 16, lda);
      wmma::load_matrix_sync(fb, kTransB ? b + n * 16 * ldb + k * 16 : b + k * 16 * ldb + n * 16, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(out + n * 16, acc, ldo, wmma::mem_row_major);
  }
}

// acc[n] += A (16 x K) times B (K x N, row-major in b): accumulators kept in registers. One A
// fragment at a time (the k loop is not unrolled), reused across the N / 16 products.
template <typename T, int K, int N>
__device__ __forceinline__ void warp_gemm_acc(const T* a, int lda, const T* b, int ldb, FragC (&acc)[N / 16]) {
#pragma unroll 1
  for (int k = 0; k < K / 16; ++k) {
    FragA<T> fa;
    wmma::load_matrix_sync(fa, a + k * 16, lda);
#pragma unroll
    for (int n = 0; n < N / 16; ++n) {
      FragB<T, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, b + k * 16 * ldb + n * 16, ldb);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

// Writes a warp's 16 x N accumulators (times `mul`) to rows [r0, r0 + 16), columns [c0, c0 + N)
// of out, through columns [c0, c0 + N) of a 16-row fp32 scratch of pitch ld; rows at or past
// `len` are skipped.
template <typename T, int N>
__device__ __forceinline__ void store_rows(FragC (&acc)[N / 16], float mul, float* scratch, int ld, T* out,
                                           int64_t row_stride, int r0, int c0, int len) {
#pragma unroll
  for (int n = 0; n < N / 16; ++n) wmma::store_matrix_sync(scratch + c0 + n * 16, acc[n], ld, wmma::mem_row_major);
  __syncwarp();
  const int lane = threadIdx.x % 32;
  for (int i = lane; i < 16 * N; i += 32) {
    const int r = i / N, c = c0 + i % N;
    if (r0 + r < len) out[(r0 + r) * row_stride + c] = from_float<T>(scratch[r * ld + c] * mul);
  }
  __syncwarp();
}

// Shared memory of a kernel: kTiles (64 x D) tiles in the storage dtype, kExtra floats, then per
// 16-row group of the block (kWarps of them) a 16 x max(D, 64) fp32 scratch, a 16 x kSecond fp32
// one, and kLow 16 x 64 tiles in the storage dtype. Every region starts 32-byte aligned, as
// WMMA loads and stores need.
template <typename T, int D, int kTiles, int kExtra, int kSecond, int kLow = 1>
struct Smem {
  static constexpr int LD = D + kPad, LDP = kBlock + kPad, LDF = D > kBlock ? D : kBlock;
  static constexpr int kBytes = kTiles * kBlock * LD * int(sizeof(T)) +
                                (kExtra + kWarps * 16 * (LDF + kSecond)) * 4 +
                                kLow * kWarps * 16 * LDP * int(sizeof(T));
  unsigned char* base;
  __device__ T* tile(int i) const { return reinterpret_cast<T*>(base) + i * kBlock * LD; }
  __device__ float* extra() const { return reinterpret_cast<float*>(tile(kTiles)); }
  __device__ float* scratch(int group) const { return extra() + kExtra + group * 16 * LDF; }
  __device__ float* second(int group) const {
    return extra() + kExtra + kWarps * 16 * LDF + group * 16 * kSecond;
  }
  __device__ T* low(int group, int i = 0) const {
    return reinterpret_cast<T*>(extra() + kExtra + kWarps * 16 * (LDF + kSecond)) + (i * kWarps + group) * 16 * LDP;
  }
};

// Q, K, V tiles; per warp: the fp32 scratch (S, then P V), fp32 O, P in the storage dtype.
template <typename T, int D>
using FwdSmem = Smem<T, D, 3, 0, D>;

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_kernel(Params p) {
  using L = FwdSmem<T, D>;
  constexpr int LD = L::LD, LDP = L::LDP, LDF = L::LDF;
  const L sm{dynamic_smem()};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T *sQ = sm.tile(0), *sK = sm.tile(1), *sV = sm.tile(2), *sP = sm.low(warp);
  float *sS = sm.scratch(warp), *sO = sm.second(warp);

  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * kBlock;
  const Seq s = seq_of(p, b);
  if (m0 >= s.len_q) return;
  const int hk = h / p.group;
  const T* k = rows<const T>(p.k, b, s.k0, hk);
  const T* v = rows<const T>(p.v, b, s.k0, hk);
  T* o = rows<T>(p.o, b, s.q0, h);

  load_tile<T, D>(sQ, rows<const T>(p.q, b, s.q0, h), p.q.s, m0, s.len_q, p.vec);
  for (int i = lane; i < 16 * D; i += 32) sO[i] = 0.0f;
  // Lanes 2r and 2r + 1 own row r of the warp's 16: columns [0, 32) and [32, 64) of a block.
  const int r = lane / 2, half = lane % 2;
  const int qi = m0 + warp * 16 + r;
  float m_i = -INFINITY, l_i = 0.0f;
  const int n_end = keys_end(p, s, m0, kBlock);
  for (int n0 = 0; n0 < n_end; n0 += kBlock) {
    __syncthreads();  // the previous K and V tiles are consumed
    load_tile<T, D>(sK, k, p.k.s, n0, s.len_k, p.vec);
    load_tile<T, D>(sV, v, p.v.s, n0, s.len_k, p.vec);
    tile_wait();
    __syncthreads();
    warp_gemm<T, D, kBlock, true>(sQ + warp * 16 * LD, LD, sK, LD, sS, LDF);
    __syncwarp();
    float mx = -INFINITY;
    for (int j = 0; j < kBlock / 2; ++j) {
      const int c = column<kBlock / 2>(half, r, j);
      const float x = allowed(p, b, s, qi, n0 + c) ? sS[r * LDF + c] * p.scale2 : -INFINITY;
      sS[r * LDF + c] = x;
      mx = fmaxf(mx, x);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_i, mx);
    // Nothing allowed yet: keep m at -inf, add zeros (no inf - inf).
    const float alpha = m_new == -INFINITY ? 1.0f : exp2f(m_i - m_new);
    float sum = 0.0f;
    for (int j = 0; j < kBlock / 2; ++j) {
      const int c = column<kBlock / 2>(half, r, j);
      const float pv = m_new == -INFINITY ? 0.0f : exp2f(sS[r * LDF + c] - m_new);
      sum += pv;  // the normalizer sums every probability, dropped or not
      const bool drop = p.p_drop > 0.0f && !kept(p, b * p.heads + h, qi, n0 + c);
      sP[r * LDP + c] = from_float<T>(drop ? 0.0f : pv * p.keep_scale);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_i = l_i * alpha + sum;
    m_i = m_new;
    __syncwarp();
    warp_gemm<T, kBlock, D, false>(sP, LDP, sV, LD, sS, LDF);  // P V into the scratch
    __syncwarp();
    for (int j = 0; j < D / 2; ++j) {
      const int c = column<D / 2>(half, r, j);
      sO[r * D + c] = sO[r * D + c] * alpha + sS[r * LDF + c];
    }
    __syncwarp();
  }
  tile_wait();  // the Q copy, when no key block was visited
  __syncwarp();  // ... and O's zeros, which other lanes wrote, when no key block was visited
  if (qi < s.len_q) {
    // A row that saw no key gives zeros. l_i >= 1 (the row max contributes 1): the fast
    // reciprocal is exact enough and calls no slow-path routine.
    const float inv = l_i > 0.0f ? __fdividef(1.0f, l_i) : 0.0f;
    for (int c = half * D / 2; c < (half + 1) * D / 2; ++c)
      o[qi * p.o.s + c] = from_float<T>(sO[r * D + c] * inv);
    // +inf for a row that saw no key, as the Triton kernel writes it: exp2(s - lse) is then 0.
    if (half == 0) p.lse[b * p.lse_b + h * p.lse_h + s.q0 + qi] = l_i > 0.0f ? m_i + log2f(l_i) : INFINITY;
  }
}

// dK/dV give each 16 key rows two warps (8 in all): one computes S^T, the other dP^T, and each
// accumulates half of dK's and dV's columns. A warp holding all D columns of both needs 2 D fp32
// registers for them alone: at D = 128 that left ptxas too few and it spilled (sm_80).
constexpr int kDkdvWarps = 2 * kWarps;
constexpr int kDkdvThreads = 32 * kDkdvWarps;

// K, V, Q, dO tiles; a query block's log-sum-exp and delta; per 16 key rows: fp32 S^T (also the
// epilogue's 16 x D scratch), fp32 dP^T, then P^T and dS^T in the storage dtype.
template <typename T, int D>
using DkdvSmem = Smem<T, D, 4, 2 * kBlock, kBlock, 2>;

// dK, dV for one key block of one key/value head: loops over the query heads of its group and
// over the query blocks that can see it.
template <typename T, int D>
__global__ void __launch_bounds__(kDkdvThreads, 1) attention_bwd_dkdv_kernel(Params p) {
  using L = DkdvSmem<T, D>;
  constexpr int LD = L::LD, LDP = L::LDP, LDF = L::LDF, kHalf = D / 2;
  static_assert(kHalf % 16 == 0, "each warp of a pair takes whole 16-column tiles");
  const L sm{dynamic_smem()};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Key rows [16 grp, + 16) of the block; `part` 0 computes S^T, 1 dP^T; accumulator columns
  // [part * D / 2, + D / 2).
  const int grp = warp % kWarps, part = warp / kWarps, c_acc = part * kHalf;
  T *sK = sm.tile(0), *sV = sm.tile(1), *sQ = sm.tile(2), *sdO = sm.tile(3);
  T *sPT = sm.low(grp, 0), *sdST = sm.low(grp, 1);
  float *sL = sm.extra(), *sDelta = sm.extra() + kBlock, *sS = sm.scratch(grp), *sdP = sm.second(grp);

  const int b = blockIdx.z, hk = blockIdx.y, n0 = blockIdx.x * kBlock;
  const Seq s = seq_of(p, b);
  if (n0 >= s.len_k) return;
  load_tile<T, D, kDkdvThreads>(sK, rows<const T>(p.k, b, s.k0, hk), p.k.s, n0, s.len_k, p.vec);
  load_tile<T, D, kDkdvThreads>(sV, rows<const T>(p.v, b, s.k0, hk), p.v.s, n0, s.len_k, p.vec);
  FragC dk[kHalf / 16], dv[kHalf / 16];
#pragma unroll
  for (int n = 0; n < kHalf / 16; ++n) {
    wmma::fill_fragment(dk[n], 0.0f);
    wmma::fill_fragment(dv[n], 0.0f);
  }
  // The pointwise pass: lane (r, h) of warp `part` takes row r, 16 of the 64 query columns.
  const int r = lane / 2, half = lane % 2, c_pw = part * (kBlock / 2) + half * (kBlock / 4);
  const int kj = n0 + grp * 16 + r;  // this lane's key
  const int m_start = first_query(p, s, n0, kBlock);
  for (int g = 0; g < p.group; ++g) {
    const int h = hk * p.group + g;
    const T* q = rows<const T>(p.q, b, s.q0, h);
    const T* dout = rows<const T>(p.dout, b, s.q0, h);
    const float* lse = p.lse + b * p.lse_b + h * p.lse_h + s.q0;
    const float* delta = p.delta + b * p.lse_b + h * p.lse_h + s.q0;
    for (int m0 = m_start; m0 < s.len_q; m0 += kBlock) {
      __syncthreads();  // the previous Q and dO tiles, P^T and dS^T are consumed
      load_tile<T, D, kDkdvThreads>(sQ, q, p.q.s, m0, s.len_q, p.vec);
      load_tile<T, D, kDkdvThreads>(sdO, dout, p.dout.s, m0, s.len_q, p.vec);
      for (int i = threadIdx.x; i < kBlock; i += kDkdvThreads) {
        const bool in = m0 + i < s.len_q;
        sL[i] = in ? lse[m0 + i] : INFINITY;
        sDelta[i] = in ? delta[m0 + i] : 0.0f;
      }
      tile_wait();  // also the K and V tiles, on the first pass
      __syncthreads();
      if (part == 0)
        warp_gemm<T, D, kBlock, true>(sK + grp * 16 * LD, LD, sQ, LD, sS, LDF);  // S^T = K Q^T
      else
        warp_gemm<T, D, kBlock, true>(sV + grp * 16 * LD, LD, sdO, LD, sdP, kBlock);  // dP^T = V dO^T
      __syncthreads();  // both products of the group are in shared memory
#pragma unroll 1  // unrolled, its loads were hoisted past the accumulators' registers and spilled
      for (int j = 0; j < kBlock / 4; ++j) {
        const int c = c_pw + (j + r) % (kBlock / 4);  // lanes start apart: different banks
        const bool ok = allowed(p, b, s, m0 + c, kj) && sL[c] != INFINITY;
        const float pt = ok ? exp2f(sS[r * LDF + c] * p.scale2 - sL[c]) : 0.0f;
        float dp = sdP[r * kBlock + c], pt_kept = pt;
        if (p.p_drop > 0.0f) {
          const bool keep = kept(p, b * p.heads + h, m0 + c, kj);
          pt_kept = keep ? pt * p.keep_scale : 0.0f;
          dp = keep ? dp * p.keep_scale : 0.0f;
        }
        sPT[r * LDP + c] = from_float<T>(pt_kept);
        sdST[r * LDP + c] = from_float<T>(pt * (dp - sDelta[c]));
      }
      __syncthreads();  // the group's P^T and dS^T are whole
      warp_gemm_acc<T, kBlock, kHalf>(sPT, LDP, sdO + c_acc, LD, dv);  // dV += P^T dO
      warp_gemm_acc<T, kBlock, kHalf>(sdST, LDP, sQ + c_acc, LD, dk);  // dK += dS^T Q
    }
  }
  tile_wait();  // the K and V copies, when no query block was visited
  __syncthreads();  // the scratch (S^T) is read by both warps of a group before it is reused
  T* out_k = rows<T>(p.dk, b, s.k0, hk);
  T* out_v = rows<T>(p.dv, b, s.k0, hk);
  store_rows<T, kHalf>(dk, p.scale, sS, LDF, out_k, p.dk.s, n0 + grp * 16, c_acc, s.len_k);
  store_rows<T, kHalf>(dv, 1.0f, sS, LDF, out_v, p.dv.s, n0 + grp * 16, c_acc, s.len_k);
}

// delta = rowsum(dO * O) for every query row, laid out like the log-sum-exp: what both backward
// kernels (WMMA and wgmma) read. One warp per (row, head), a lane per D / 32 values.
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

// dQ for one query block of one head: loops over the key blocks it sees. Q, dO, K, V tiles;
// per warp: fp32 S (also the epilogue's scratch), fp32 dP, dS in the storage dtype.
template <typename T, int D>
using DqSmem = Smem<T, D, 4, 0, kBlock>;

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dq_kernel(Params p) {
  using L = DqSmem<T, D>;
  constexpr int LD = L::LD, LDP = L::LDP, LDF = L::LDF;
  const L sm{dynamic_smem()};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T *sQ = sm.tile(0), *sdO = sm.tile(1), *sK = sm.tile(2), *sV = sm.tile(3), *sdS = sm.low(warp);
  float *sS = sm.scratch(warp), *sdP = sm.second(warp);

  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * kBlock;
  const Seq s = seq_of(p, b);
  if (m0 >= s.len_q) return;
  const int hk = h / p.group;
  const T* k = rows<const T>(p.k, b, s.k0, hk);
  const T* v = rows<const T>(p.v, b, s.k0, hk);
  load_tile<T, D>(sQ, rows<const T>(p.q, b, s.q0, h), p.q.s, m0, s.len_q, p.vec);
  load_tile<T, D>(sdO, rows<const T>(p.dout, b, s.q0, h), p.dout.s, m0, s.len_q, p.vec);
  const int r = lane / 2, half = lane % 2;
  const int qi = m0 + warp * 16 + r;
  const int64_t row = b * p.lse_b + h * p.lse_h + s.q0 + qi;
  const float lse = qi < s.len_q ? p.lse[row] : INFINITY;
  const float delta = qi < s.len_q ? p.delta[row] : 0.0f;
  FragC dq[D / 16];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(dq[n], 0.0f);
  const int n_end = keys_end(p, s, m0, kBlock);
  for (int n0 = 0; n0 < n_end; n0 += kBlock) {
    __syncthreads();
    load_tile<T, D>(sK, k, p.k.s, n0, s.len_k, p.vec);
    load_tile<T, D>(sV, v, p.v.s, n0, s.len_k, p.vec);
    tile_wait();  // also the Q and dO tiles, on the first pass
    __syncthreads();
    warp_gemm<T, D, kBlock, true>(sQ + warp * 16 * LD, LD, sK, LD, sS, LDF);      // S = Q K^T
    warp_gemm<T, D, kBlock, true>(sdO + warp * 16 * LD, LD, sV, LD, sdP, kBlock);  // dP = dO V^T
    __syncwarp();
    for (int j = 0; j < kBlock / 2; ++j) {
      const int c = column<kBlock / 2>(half, r, j);
      const bool ok = allowed(p, b, s, qi, n0 + c) && lse != INFINITY;
      const float pv = ok ? exp2f(sS[r * LDF + c] * p.scale2 - lse) : 0.0f;
      float dp = sdP[r * kBlock + c];
      if (p.p_drop > 0.0f) dp = kept(p, b * p.heads + h, qi, n0 + c) ? dp * p.keep_scale : 0.0f;
      sdS[r * LDP + c] = from_float<T>(pv * (dp - delta));
    }
    __syncwarp();
    warp_gemm_acc<T, kBlock, D>(sdS, LDP, sK, LD, dq);  // dQ += dS K
  }
  tile_wait();  // the Q and dO copies, when no key block was visited
  __syncwarp();
  store_rows<T, D>(dq, p.scale, sS, LDF, rows<T>(p.dq, b, s.q0, h), p.dq.s, m0 + warp * 16, 0, s.len_q);
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
           DkdvSmem<T, D>::kBytes, p, st, kDkdvThreads);
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

// With `wgmma`, the Hopper kernels where they can serve the call, else the WMMA ones; returns
// which ran ("wgmma", "wmma" or "wmma (wgmma declined: <why>)").
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
  return declined.empty() ? "wmma" : "wmma (wgmma declined: " + declined + ")";
}

}  // namespace

std::string launch_forward(const ForwardArgs& a, std::uintptr_t stream) {
  Params p = params_of(a.p);
  p.o = operand(a.o, a.p.cu_q.has_value());
  p.lse = static_cast<float*>(a.lse.data);
  p.vec = aligned16(p.q) && aligned16(p.k) && aligned16(p.v);
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
  dispatch<Delta>(a.p, p, stream);  // for whichever kernels run next
  return run_preferring_wgmma<Backward>(a.p, p, a.wgmma, stream);
}

}  // namespace fusedlm::attention

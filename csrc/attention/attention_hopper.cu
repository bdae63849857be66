// Attention for Hopper (sm_90a), forward and backward: wgmma tensor-core matrix products and the
// bulk tensor copy engine (TMA), in the FlashAttention-3 arrangement. The same algorithm and
// results as the mma.sync kernels (attention_kernels.cu): base-2 online softmax, the base-2
// log-sum-exp saved for the backward, the same masks and dropout draws, and the same atomic-free
// backward (dK/dV per key block, dQ per query block).
//
// A CTA is three warpgroups:
// - a producer (one thread of warpgroup 0) loads the CTA's fixed tiles once (forward: Q; dK/dV:
//   K, V; dQ: Q, dO) and streams the others block by block (K, V; Q, dO; K, V) through a
//   shared-memory ring of three stages (head dim 64) or two (128) with TMA, each stage
//   completing on an mbarrier (in dK/dV, a second producer warp stages each step's log-sum-exp
//   and delta rows beside the tiles);
// - two consumers (warpgroups 1 and 2), 64 rows each, run the products on wgmma: those against
//   the head dim with both operands in shared memory; those against the streamed block with
//   the probabilities (or dS) straight from registers (an accumulator's layout is the A-fragment
//   layout of the next product) and V, dO, Q or K read MN-major (the transpose bit), so nothing
//   is rewritten in shared memory. Each consumer thread arrives on the stage's "empty" barrier
//   once its products are done. A block's score products are issued together with the previous
//   block's right-hand products, and its softmax (or dS) runs while those are in flight; in the
//   forward the two consumers also take turns issuing (ping-pong).
// setmaxnreg moves registers from the producer to the consumers. Tiles are 64 columns (128 B)
// wide, TMA's 128-byte swizzle; a head dim of 128 is two such slabs side by side.
//
// Covers head dims 64 and 128, fp16 and bf16, 16-byte aligned operands; wgmma_unavailable says
// why it declines anything else, and the mma.sync kernels serve it. The machinery (mbarriers,
// TMA, wgmma) is common/hopper.cuh's, which the CPU emulator stands in for (csrc/emu).
#include <cuda.h>          // CUtensorMap and its enums (types only: no link to the driver)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../common/cuda_runtime.h"
#include "../common/dtype_dispatch.h"
#include "../common/hopper.cuh"
#include "../common/launch.cuh"
#include "attention.h"
#include "attention_device.cuh"

namespace fusedlm::attention {
namespace {

using namespace detail;

constexpr int kThreads = 384;   // a producer warpgroup and two consumer warpgroups
constexpr int kConsumers = 256;
constexpr int kRowBytes = 128;  // a tile row: 64 two-byte elements, one 128-byte swizzle span
constexpr int kProducerRegs = 40, kConsumerRegs = 232;
static_assert(kProducerRegs * 128 + kConsumerRegs * 2 * 128 <= 65536, "register file");

// Shared memory of every kernel here, from a 1024-byte aligned base (the 128-byte swizzle
// repeats every 1024 bytes, and the wgmma descriptors assume tiles start on that boundary):
// kFixed tiles of kFixedRows rows loaded once, then a ring of kStages stages (streamed blocks in
// flight), each two tiles of kStreamRows rows, then (kStats) each stage's fp32 row statistics
// (dK/dV: the streamed rows' log-sum-exp and delta, kStreamRows each), then the mbarriers
// (fixed, full[kStages], empty[kStages]). A (rows x D) tile is D / 64 column slabs of
// (rows x 64), each slab's rows 128 bytes apart.
//   forward: Q fixed; K, V streamed.  dK/dV: K, V fixed; Q, dO (and lse, delta) streamed.
//   dQ: Q, dO fixed; K, V streamed.
template <int D, int kFixed, int kFixedRows, int kStreamRows, int kStages_, bool kStats = false>
struct Ring {
  static constexpr int kStages = kStages_;
  static constexpr int kFixedBytes = kFixedRows * D * 2, kStreamBytes = kStreamRows * D * 2;
  static constexpr int kStream0 = kFixed * kFixedBytes;               // stage s: + s * kStreamBytes
  static constexpr int kStream1 = kStream0 + kStages * kStreamBytes;  // stage s: + s * kStreamBytes
  static constexpr int kStatBytes = kStats ? 2 * kStreamRows * 4 : 0;  // lse, then delta
  static constexpr int kStat = kStream1 + kStages * kStreamBytes;      // stage s: + s * kStatBytes
  static constexpr int kBars = kStat + kStages * kStatBytes;
  static constexpr int kBytes = kBars + 8 * (1 + 2 * kStages) + 1024;  // + alignment slack
  static_assert(kBytes <= 227 * 1024, "shared memory per block");
};

// Block shapes: the forward and dQ give each consumer 64 query rows (128 per CTA) against
// blocks of 128 keys (forward) or 64 (dQ: S and dP both live in registers); dK/dV gives each
// consumer 64 key rows (128 per CTA) against blocks of 64 queries.
// Stages: a block's copy is issued when the stage kStages - 1 blocks back is released, so it has
// about kStages - 1 blocks' products to land. At head dim 64 a block's products take half as
// long as at 128 (about 1000 cycles a CTA at the forward's 128 x 128), less than a copy from
// DRAM may take: three stages there, two at 128 (where a third would leave the forward no room).
template <int D>
constexpr int kStagesFor = D == 64 ? 3 : 2;
template <int D>
using FwdRing = Ring<D, 1, 128, 128, kStagesFor<D>>;
template <int D>
using DkdvRing = Ring<D, 2, 128, 64, kStagesFor<D>, true>;
template <int D>
using DqRing = Ring<D, 2, 128, 64, kStagesFor<D>>;

// Where the row, head and batch coordinates go among a tensor map's dims 1..3 (dim 0 is the
// head dim); the host orders the dims by stride.
struct MapOrder {
  int row, head, batch;
};

// A tensor map and its order; passed by value as a __grid_constant__ kernel parameter.
struct Map {
  CUtensorMap map;
  MapOrder order;
};

#ifdef FUSEDLM_SM90_DEVICE
using namespace hopper;

// Rows [row, row + box) of columns [col, col + 64) of (head, batch) into shared memory at dst;
// rows past the tensor's end arrive as zeros. Completes on `bar`.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, MapOrder o, int col, int row,
                                         int head, int batch, uint32_t bar) {
  const auto at = [&](int dim) { return o.row == dim ? row : o.head == dim ? head : batch; };
  tma_load_4d(dst, map, col, at(1), at(2), at(3), bar);
}

// Operands in a (tile_rows x D) tile stored as 64-column slabs (see Ring), 1024-byte aligned:
// K-major: 64 rows from r0 (a multiple of 8), head-dim columns [16 kk, 16 kk + 16): the slab
// kk / 4, 32 bytes further per step within the swizzle span.
__device__ __forceinline__ uint64_t k_major(uint32_t tile, int tile_rows, int r0, int kk) {
  return smem_desc(tile + (kk / 4) * tile_rows * kRowBytes + r0 * kRowBytes + (kk % 4) * 32, 16, 8 * kRowBytes);
}
// MN-major, the tile's rows along K: rows [16 j, 16 j + 16), every head-dim column (the slabs
// one tile_rows * 128 bytes apart).
__device__ __forceinline__ uint64_t mn_major(uint32_t tile, int tile_rows, int j) {
  return smem_desc(tile + j * 16 * kRowBytes, tile_rows * kRowBytes, 8 * kRowBytes);
}

// Issues acc = A B^T over the head dim (SS, both K-major): A is rows [r0, r0 + 64) of an
// a_rows-row tile, B all N rows of an N-row tile.
template <typename T, int N, int D>
__device__ __forceinline__ void issue_abt(float (&acc)[N / 2], uint32_t a, int a_rows, int r0, uint32_t b) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)  // 16 head-dim columns per step
    wgmma_ss<T, N>(acc, k_major(a, a_rows, r0, kk), k_major(b, N, 0, kk), kk > 0);
}

// Writes an (m64 x D) accumulator, times `mul`, to rows [row0, row0 + 64) of out (pitch
// `stride`); rows at or past `len` are skipped.
template <typename T, int D>
__device__ __forceinline__ void store_acc(const float (&acc)[D / 2], float mul, T* out, int64_t stride, int row0,
                                          int len, int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + acc_row(r, t);
    if (row >= len) continue;
#pragma unroll
    for (int c = 0; c < D / 8; ++c)
      *reinterpret_cast<uint32_t*>(out + int64_t(row) * stride + acc_col(4 * c, t % 32)) =
          mma::pack<T>(acc[4 * c + 2 * r] * mul, acc[4 * c + 2 * r + 1] * mul);
  }
}

// Writes an (m64 x N) accumulator as it is, fp32, to the row-major (64 x N) array out.
template <int N>
__device__ __forceinline__ void store_acc_f32(const float (&acc)[N / 2], float* out, int t) {
#pragma unroll
  for (int i = 0; i < N / 2; ++i) out[acc_row(acc_half(i), t) * N + acc_col(i, t % 32)] = acc[i];
}

// A (tile_rows x D) tile: rows [row, row + tile_rows) of (head, batch), one TMA copy per slab.
template <int D>
__device__ __forceinline__ void tma_tile(uint32_t dst, const Map& m, int tile_rows, int64_t row, int head, int batch,
                                         uint32_t bar) {
#pragma unroll
  for (int sl = 0; sl < D / 64; ++sl)
    tma_load(dst + sl * tile_rows * kRowBytes, &m.map, m.order, 64 * sl, int(row), head, batch, bar);
}

// The barriers of a Ring: `fixed` completes once; stage st's `full` when its tiles have landed
// (the producer waits for `empty` before refilling it), `empty` when all consumers are done.
// Streamed step n uses stage n % kStages, whose barriers complete a phase once per use.
template <int kStages>
struct Bars {
  uint32_t fixed;
  __device__ uint32_t full(int st) const { return fixed + 8 + 8 * st; }
  __device__ uint32_t empty(int st) const { return fixed + 8 + 8 * kStages + 8 * st; }
  // Consumers: the fixed tiles have landed; step n's tiles have.
  __device__ void wait_fixed() const { bar_wait(fixed, 0); }
  __device__ void wait_full(int n) const { bar_wait(full(n % kStages), (n / kStages) & 1); }
  // The producer, before loading step n >= kStages: the consumers are done with step n - kStages.
  __device__ void wait_empty(int n) const { bar_wait_or_trap(empty(n % kStages), (n / kStages - 1) & 1); }
  // Consumers: this thread is done with step n's stage.
  __device__ void release(int n, int line = __builtin_LINE()) const { bar_arrive(empty(n % kStages), line); }
  // The producer, after its last load: the fixed tiles have landed and the consumers are done
  // with every step, so that its watch covers every barrier of the CTA.
  __device__ void drain(int n_steps) const {
    bar_wait_or_trap(fixed, 0);
    for (int n = n_steps > kStages ? n_steps : kStages; n < n_steps + kStages; ++n) wait_empty(n);
  }
};

// Thread 0 initializes the barriers; the CTA then splits into the producer warpgroup (true:
// registers handed back) and the consumers (false: registers taken). A stage is full after
// full_arrivals arrivals (the copying thread's, and any stager's) and its copies' bytes.
template <int kStages>
__device__ __forceinline__ bool split_roles(const Bars<kStages>& bars, int full_arrivals = 1) {
  if (threadIdx.x == 0) {
    bar_init(bars.fixed, 1);
    for (int st = 0; st < kStages; ++st) {
      bar_init(bars.full(st), full_arrivals);
      bar_init(bars.empty(st), kConsumers);
    }
    fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    regs_dec<kProducerRegs>();
    return true;
  }
  regs_inc<kConsumerRegs>();
  return false;
}

// Producer: the fixed tiles once, then n_steps stages of two streamed tiles; step(n, row, head)
// says which rows and head step n reads.
template <int D, typename L, typename Step>
__device__ __forceinline__ void produce(uint32_t base, const Bars<L::kStages>& bars, const Map& f0, const Map* f1, int64_t f_row,
                                        int f_head, const Map& s0, const Map& s1, int batch, int n_steps, Step step) {
  if (threadIdx.x != 0) return;
  constexpr int kFixed = L::kStream0 / L::kFixedBytes;
  bar_expect(bars.fixed, kFixed * L::kFixedBytes);
  tma_tile<D>(base, f0, L::kFixedBytes / (D * 2), f_row, f_head, batch, bars.fixed);
  if (f1) tma_tile<D>(base + L::kFixedBytes, *f1, L::kFixedBytes / (D * 2), f_row, f_head, batch, bars.fixed);
  constexpr int kRows = L::kStreamBytes / (D * 2);
  for (int n = 0; n < n_steps; ++n) {
    const int st = n % L::kStages;
    if (n >= L::kStages) bars.wait_empty(n);
    bar_expect(bars.full(st), 2 * L::kStreamBytes);
    int64_t row;
    int head;
    step(n, row, head);
    tma_tile<D>(base + L::kStream0 + st * L::kStreamBytes, s0, kRows, row, head, batch, bars.full(st));
    tma_tile<D>(base + L::kStream1 + st * L::kStreamBytes, s1, kRows, row, head, batch, bars.full(st));
  }
  bars.drain(n_steps);
}

__device__ __forceinline__ uint32_t aligned_base() {
  return (smem_addr(dynamic_smem()) + 1023u) & ~1023u;
}

// A generic pointer to the shared-memory window address `at` (for ordinary loads and stores).
template <typename T>
__device__ __forceinline__ T* smem_ptr(uint32_t at) {
  unsigned char* const smem = dynamic_smem();
  return reinterpret_cast<T*>(smem + (at - smem_addr(smem)));
}

// A producer warp's part in the dK/dV kernel: each step's row statistics (the log-sum-exp and
// delta of the streamed rows [row, row + kStreamRows) of `head`: +inf and 0 past end_row, so
// that their probabilities are 0) into the stage, beside the copy engine's tiles. The consumers
// then read them from shared memory, not from global memory on the critical path between a
// step's scores and its probabilities. The warp's 32 arrivals complete the stage with the copies.
template <typename L, typename Step>
__device__ __forceinline__ void stage_row_stats(uint32_t base, const Bars<L::kStages>& bars, const float* lse, const float* delta,
                                                int64_t head_stride, int64_t end_row, int n_steps, Step step) {
  constexpr int kRows = L::kStatBytes / 8;
  const int lane = threadIdx.x % 32;
  for (int n = 0; n < n_steps; ++n) {
    const int st = n % L::kStages;
    if (n >= L::kStages) bars.wait_empty(n);
    int64_t row;
    int head;
    step(n, row, head);
    float* const out = smem_ptr<float>(base + L::kStat + st * L::kStatBytes);
#pragma unroll
    for (int i = 0; i < kRows / 32; ++i) {
      const int r = lane + 32 * i;
      const bool in = row + r < end_row;
      out[r] = in ? lse[head * head_stride + row + r] : INFINITY;
      out[kRows + r] = in ? delta[head * head_stride + row + r] : 0.0f;
    }
    bar_arrive(bars.full(st));
  }
}

// Zeroes rows [from, rows) of two streamed (rows x D) tiles. In a pack, a block that runs past its
// sequence's end holds rows of the next sequence, or of none (anything, NaN included, may be
// there: the other kernels never read such rows); the masks zero their probabilities, but a
// product still turns 0 x NaN into NaN. The 256 consumer threads (t) share the stores (a whole
// 128-byte row is zero under any swizzle), then meet at a named barrier; the fence makes the
// stores visible to the products' reads.
template <int D>
__device__ __forceinline__ void zero_rows_past_end(uint32_t tile0, uint32_t tile1, int rows, int from, int t) {
  const int chunks = (rows - from) * 8;  // 16-byte chunks of one slab's rows past the end
  for (int c = t; c < 2 * (D / 64) * chunks; c += kConsumers) {
    const int tile = c / ((D / 64) * chunks), sl = c / chunks % (D / 64), k = c % chunks;
    const uint32_t at = (tile ? tile1 : tile0) + sl * rows * kRowBytes + from * kRowBytes + k * 16;
    struct alignas(16) Chunk {
      uint64_t lo, hi;
    };
    *smem_ptr<Chunk>(at) = Chunk{0, 0};
  }
  fence_proxy_async();
  named_barrier_sync(1, kConsumers);
}

#endif  // FUSEDLM_SM90_DEVICE

// Forward. Per CTA: 128 query rows of one head; each key block: S = Q K^T (SS), the online
// softmax on the accumulators, O += P V (RS, V MN-major).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attention_fwd_wgmma_kernel(const __grid_constant__ Map map_q, const __grid_constant__ Map map_k,
                               const __grid_constant__ Map map_v, const Params p) {
#ifdef FUSEDLM_SM90_DEVICE
  using L = FwdRing<D>;
  constexpr int kRows = 128, kKeys = 128;
  const uint32_t base = aligned_base();
  const Bars<L::kStages> bars{base + L::kBars};
  const int b = blockIdx.z, h = blockIdx.y;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kRows;  // longest (causal) blocks first
  const Seq s = seq_of(p, b);
  if (m0 >= s.len_q) return;
  const int n_end = keys_end(p, s, m0, kRows);
  const int n_blocks = n_end > 0 ? (n_end + kKeys - 1) / kKeys : 0;
  const int batch = p.cu_q ? 0 : b;  // packed sequences: one batch of total rows

  if (split_roles(bars)) {
    const int hk = h / p.group;
    produce<D, L>(base, bars, map_q, nullptr, s.q0 + m0, h, map_k, map_v, batch, n_blocks,
                  [&](int n, int64_t& row, int& head) {
                    row = s.k0 + int64_t(n) * kKeys;
                    head = hk;
                  });
    return;
  }
  const int t = threadIdx.x - 128, wg = t / 128, lane = t % 32;
  const int qi[2] = {m0 + 64 * wg + acc_row(0, t), m0 + 64 * wg + acc_row(1, t)};
  const int bh = b * p.heads + h;
  const int diag = m0 + s.len_k - s.len_q;  // the last key the CTA's first row may see (causal)

  const auto k_tile = [&](int n) { return base + L::kStream0 + (n % L::kStages) * L::kStreamBytes; };
  const auto v_tile = [&](int n) { return base + L::kStream1 + (n % L::kStages) * L::kStreamBytes; };

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.0f, 0.0f};
  uint32_t pa[kKeys / 16][4];  // P of the block whose O += P V is issued next

  // Block n's online softmax, in place: the scores sc become P (zero where dropout drops),
  // m_i and l_i advance, and alpha is the factor of O so far.
  const auto softmax = [&](float(&sc)[kKeys / 2], int n, float(&alpha)[2]) {
    const int n0 = n * kKeys;
    // The per-element mask: past the keys' end, a padding mask, or across the causal diagonal.
    const bool edge = n0 + kKeys > s.len_k || p.key_mask != nullptr || (p.causal && n0 + kKeys - 1 > diag);
    float mx[2] = {m_i[0], m_i[1]};
#pragma unroll
    for (int i = 0; i < kKeys / 2; ++i) {
      float x = sc[i] * p.scale2;
      if (edge && !allowed(p, b, s, qi[acc_half(i)], n0 + acc_col(i, lane))) x = -INFINITY;
      sc[i] = x;
      mx[acc_half(i)] = fmaxf(mx[acc_half(i)], x);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = quad_max(mx[r]);
      // Nothing allowed yet: keep m at -inf and add zeros (no inf - inf).
      alpha[r] = mx[r] == -INFINITY ? 1.0f : exp2f(m_i[r] - mx[r]);
      m_i[r] = mx[r];
      l_i[r] *= alpha[r];
    }
#pragma unroll
    for (int i = 0; i < kKeys / 2; i += 2) {  // (i, i + 1): keys c, c + 1 of one row, c even
      const int r = acc_half(i);
      bool keep[2] = {true, true};
      if (p.p_drop > 0.0f) kept2(p, bh, qi[r], n0 + acc_col(i, lane), keep);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float pr = m_i[r] == -INFINITY ? 0.0f : exp2f(sc[i + e] - m_i[r]);
        l_i[r] += pr;  // the normalizer sums every probability, dropped or not
        if (p.p_drop > 0.0f) pr = keep[e] ? pr * p.keep_scale : 0.0f;
        sc[i + e] = pr;
      }
    }
  };
  // O += P V for block n, V MN-major (uses pa: it must not change until the product is waited).
  const auto issue_pv = [&](int n) {
#pragma unroll
    for (int j = 0; j < kKeys / 16; ++j) wgmma_rs<T, D>(o, pa[j], mn_major(v_tile(n), kKeys, j), 1);
    wgmma_commit();
  };

  // Block n's stage has landed, and rows past a packed sequence's keys are zeros.
  const auto wait_block = [&](int n) {
    bars.wait_full(n);
    if (p.cu_k && (n + 1) * kKeys > s.len_k) zero_rows_past_end<D>(k_tile(n), v_tile(n), kKeys, s.len_k - n * kKeys, t);
  };
  // FlashAttention-3's ping-pong: the two consumers take turns issuing their products, so that
  // one's softmax runs while the other's products keep the tensor cores busy. Consumer wg's
  // turn is named barrier kTurn + wg, which the other consumer's arrivals open; consumer 0
  // goes first. Each consumer has n_blocks + 1 issues (S of block 0; S of block n with P V of
  // block n - 1; P V of the last block), and consumer 1 skips its last arrival, which no turn
  // of consumer 0 would take.
  constexpr int kTurn = 2;  // barrier 1: zero_rows_past_end
  const auto my_turn = [&] { named_barrier_sync(kTurn + wg, kConsumers); };
  const auto your_turn = [&](bool last) {
    if (wg == 0 || !last) named_barrier_arrive(kTurn + 1 - wg, kConsumers);
  };
  if (wg == 1 && n_blocks > 0) named_barrier_arrive(kTurn, kConsumers);

  // FlashAttention-3's overlap within a warpgroup: block n's S = Q K^T is issued together with
  // block n - 1's O += P V, and block n's softmax runs while that product is in flight; O is
  // rescaled, and block n - 1's stage released, once it has landed.
  // (The first block is peeled off: a loop body with a product in flight on one path only
  // makes ptxas serialize every wgmma of the kernel.)
  bars.wait_fixed();
  if (n_blocks > 0) {
    wait_block(0);
    float sc[kKeys / 2], alpha[2];
    wgmma_begin(sc);
    my_turn();
    issue_abt<T, kKeys, D>(sc, base, kRows, 64 * wg, k_tile(0));
    your_turn(false);
    wgmma_end(sc);
    softmax(sc, 0, alpha);  // O is still zero: no factor to apply
    a_fragments<T, kKeys>(sc, pa);
  }
  for (int n = 1; n < n_blocks; ++n) {
    wait_block(n);
    float sc[kKeys / 2], alpha[2];
    wgmma_begin(sc, o);
    my_turn();
    issue_abt<T, kKeys, D>(sc, base, kRows, 64 * wg, k_tile(n));
    wgmma_commit();
    issue_pv(n - 1);
    your_turn(false);
    wgmma_wait<1>();  // S has landed; P V may still be in flight
    reg_fence(sc);
    softmax(sc, n, alpha);
    wgmma_wait<0>();
    reg_fence(o);
    bars.release(n - 1);  // this thread is done with block n - 1's stage
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] *= alpha[acc_half(i)];
    a_fragments<T, kKeys>(sc, pa);
  }
  if (n_blocks > 0) {
    wgmma_begin(o);
    my_turn();
    issue_pv(n_blocks - 1);
    your_turn(true);
    wgmma_wait<0>();
    reg_fence(o);
    bars.release(n_blocks - 1);
  }

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_i[r]);
    inv[r] = l > 0.0f ? __fdividef(1.0f, l) : 0.0f;  // zeros for a row that saw no key; l >= 1
    // +inf for a row that saw no key, as the other kernels write it: exp2(s - lse) is then 0.
    if (lane % 4 == 0 && qi[r] < s.len_q)
      p.lse[b * p.lse_b + h * p.lse_h + s.q0 + qi[r]] = l > 0.0f ? m_i[r] + log2f(l) : INFINITY;
  }
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] *= inv[acc_half(i)];
  store_acc<T, D>(o, 1.0f, rows<T>(p.o, b, s.q0, h), p.o.s, m0 + 64 * wg, s.len_q, t);
#else
  __trap();  // no sm_90a code in this build: the host never launches this kernel then
#endif
}

// dK and dV for 128 key rows of one key/value head (64 per consumer), over the query heads of
// its group and the 64-query blocks that see it: S^T = K Q^T and dP^T = V dO^T (SS), then
// dV += P^T dO and dK += dS^T Q (RS, dO and Q MN-major). Accumulators stay in registers.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attention_bwd_dkdv_wgmma_kernel(const __grid_constant__ Map map_q, const __grid_constant__ Map map_k,
                                    const __grid_constant__ Map map_v, const __grid_constant__ Map map_do,
                                    const Params p) {
#ifdef FUSEDLM_SM90_DEVICE
  using L = DkdvRing<D>;
  constexpr int kKeys = 128, kRows = 64;
  const uint32_t base = aligned_base();
  const Bars<L::kStages> bars{base + L::kBars};
  const int b = blockIdx.z, hk = blockIdx.y, n0 = blockIdx.x * kKeys;
  const Seq s = seq_of(p, b);
  if (n0 >= s.len_k) return;
  const int m_start = first_query(p, s, n0, kRows);
  const int n_m = m_start < s.len_q ? (s.len_q - m_start + kRows - 1) / kRows : 0;
  const int batch = p.cu_q ? 0 : b;

  const auto step = [&](int n, int64_t& row, int& head) {  // step n: (query head, 64-row block)
    row = s.q0 + m_start + int64_t(n % n_m) * kRows;
    head = hk * p.group + n / n_m;
  };
  constexpr int kStager = 1;  // the producer warp that stages lse and delta (warp 0 copies)
  if (split_roles(bars, 1 + 32)) {
    if (threadIdx.x / 32 == kStager)
      stage_row_stats<L>(base, bars, p.lse + b * p.lse_b, p.delta + b * p.lse_b, p.lse_h, s.q0 + s.len_q,
                         p.group * n_m, step);
    else
      produce<D, L>(base, bars, map_k, &map_v, s.k0 + n0, hk, map_q, map_do, batch, p.group * n_m, step);
    return;
  }
  const int t = threadIdx.x - 128, wg = t / 128, lane = t % 32;
  const int kj[2] = {n0 + 64 * wg + acc_row(0, t), n0 + 64 * wg + acc_row(1, t)};
  const uint32_t k_tile = base, v_tile = base + L::kFixedBytes;
  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.0f;
  const int n_steps = p.group * n_m;
  const auto q_tile = [&](int n) { return base + L::kStream0 + (n % L::kStages) * L::kStreamBytes; };
  const auto do_tile = [&](int n) { return base + L::kStream1 + (n % L::kStages) * L::kStreamBytes; };
  uint32_t pa[kRows / 16][4], da[kRows / 16][4];  // P^T and dS^T of the step issued next

  // S^T = K Q^T and dP^T = V dO^T for step n.
  const auto issue_s_dp = [&](float(&pt)[kRows / 2], float(&dpt)[kRows / 2], int n) {
    issue_abt<T, kRows, D>(pt, k_tile, kKeys, 64 * wg, q_tile(n));
    issue_abt<T, kRows, D>(dpt, v_tile, kKeys, 64 * wg, do_tile(n));
    wgmma_commit();
  };
  // Step n's P^T (dropped where dropout drops) and dS^T, in place of S^T and dP^T.
  const auto probabilities = [&](float(&pt)[kRows / 2], float(&dpt)[kRows / 2], int n) {
    const int h = hk * p.group + n / n_m, m0 = m_start + (n % n_m) * kRows;
    const bool edge = p.key_mask != nullptr || n0 + kKeys > s.len_k || m0 + kRows > s.len_q ||
                      (p.causal && n0 + kKeys - 1 > m0 + s.len_k - s.len_q);
    const float* const lse = smem_ptr<const float>(base + L::kStat + (n % L::kStages) * L::kStatBytes);
    const float* const delta = lse + kRows;  // both staged by stage_row_stats
    const int bh = b * p.heads + h;
#pragma unroll
    for (int i = 0; i < kRows / 2; ++i) {
      const int qj = m0 + acc_col(i, lane), r = acc_half(i);
      // A query that saw no key, or past the end, has lse = +inf: its probabilities are 0.
      const float l = lse[acc_col(i, lane)], dl = delta[acc_col(i, lane)];
      const float pr = (!edge || allowed(p, b, s, qj, kj[r])) ? exp2f(pt[i] * p.scale2 - l) : 0.0f;
      float dp = dpt[i], pk = pr;
      if (p.p_drop > 0.0f) {
        const bool keep = kept(p, bh, qj, kj[r]);
        pk = keep ? pr * p.keep_scale : 0.0f;
        dp = keep ? dp * p.keep_scale : 0.0f;
      }
      pt[i] = pk;
      dpt[i] = pr * (dp - dl);  // dS^T
    }
  };
  // dV += P^T dO and dK += dS^T Q for step n, dO and Q MN-major (pa, da fixed until waited).
  const auto issue_dk_dv = [&](int n) {
#pragma unroll
    for (int j = 0; j < kRows / 16; ++j) {
      wgmma_rs<T, D>(dv, pa[j], mn_major(do_tile(n), kRows, j), 1);
      wgmma_rs<T, D>(dk, da[j], mn_major(q_tile(n), kRows, j), 1);
    }
    wgmma_commit();
  };

  // Step n's stage has landed, and rows past a packed sequence's queries are zeros.
  const auto wait_step = [&](int n) {
    bars.wait_full(n);
    const int m0 = m_start + (n % n_m) * kRows;
    if (p.cu_q && m0 + kRows > s.len_q) zero_rows_past_end<D>(q_tile(n), do_tile(n), kRows, s.len_q - m0, t);
  };
  bars.wait_fixed();
  if constexpr (D > 64) {
    // One step at a time: at head dim 128, keeping step n - 1's fragments beside step n's
    // scores and both accumulators needs more than the consumers' 232 registers (ptxas: 192
    // bytes spilled, and every wgmma serialized).
    for (int n = 0; n < n_steps; ++n) {
      wait_step(n);
      float pt[kRows / 2], dpt[kRows / 2];
      wgmma_begin(pt, dpt);
      issue_s_dp(pt, dpt, n);
      wgmma_wait<0>();
      reg_fence(pt);
      reg_fence(dpt);
      probabilities(pt, dpt, n);
      a_fragments<T, kRows>(pt, pa);
      a_fragments<T, kRows>(dpt, da);
      wgmma_begin(dk, dv);
      issue_dk_dv(n);
      wgmma_wait<0>();
      reg_fence(dk);
      reg_fence(dv);
      bars.release(n);  // this thread is done with the stage
    }
  } else {
    // As the forward: step n's S^T and dP^T are issued together with step n - 1's dV and dK
    // products, and step n's probabilities are computed while those are in flight.
    if (n_steps > 0) {
      wait_step(0);
      float pt[kRows / 2], dpt[kRows / 2];
      wgmma_begin(pt, dpt);
      issue_s_dp(pt, dpt, 0);
      wgmma_wait<0>();
      reg_fence(pt);
      reg_fence(dpt);
      probabilities(pt, dpt, 0);
      a_fragments<T, kRows>(pt, pa);
      a_fragments<T, kRows>(dpt, da);
    }
    for (int n = 1; n < n_steps; ++n) {
      wait_step(n);
      float pt[kRows / 2], dpt[kRows / 2];
      wgmma_begin(pt, dpt, dk, dv);
      issue_s_dp(pt, dpt, n);
      issue_dk_dv(n - 1);
      wgmma_wait<1>();  // S^T and dP^T have landed; the dK and dV products may still be in flight
      reg_fence(pt);
      reg_fence(dpt);
      probabilities(pt, dpt, n);
      wgmma_wait<0>();
      reg_fence(dk);
      reg_fence(dv);
      bars.release(n - 1);  // this thread is done with step n - 1's stage
      a_fragments<T, kRows>(pt, pa);
      a_fragments<T, kRows>(dpt, da);
    }
    if (n_steps > 0) {
      wgmma_begin(dk, dv);
      issue_dk_dv(n_steps - 1);
      wgmma_wait<0>();
      reg_fence(dk);
      reg_fence(dv);
      bars.release(n_steps - 1);
    }
  }
  store_acc<T, D>(dk, p.scale, rows<T>(p.dk, b, s.k0, hk), p.dk.s, n0 + 64 * wg, s.len_k, t);
  store_acc<T, D>(dv, 1.0f, rows<T>(p.dv, b, s.k0, hk), p.dv.s, n0 + 64 * wg, s.len_k, t);
#else
  __trap();
#endif
}

// dQ for 128 query rows of one head (64 per consumer), over 64-key blocks: S = Q K^T and
// dP = dO V^T (SS), then dQ += dS K (RS, K MN-major).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attention_bwd_dq_wgmma_kernel(const __grid_constant__ Map map_q, const __grid_constant__ Map map_k,
                                  const __grid_constant__ Map map_v, const __grid_constant__ Map map_do,
                                  const Params p) {
#ifdef FUSEDLM_SM90_DEVICE
  using L = DqRing<D>;
  constexpr int kRows = 128, kKeys = 64;
  const uint32_t base = aligned_base();
  const Bars<L::kStages> bars{base + L::kBars};
  const int b = blockIdx.z, h = blockIdx.y;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kRows;
  const Seq s = seq_of(p, b);
  if (m0 >= s.len_q) return;
  const int n_end = keys_end(p, s, m0, kRows);
  const int n_blocks = n_end > 0 ? (n_end + kKeys - 1) / kKeys : 0;
  const int batch = p.cu_q ? 0 : b;

  if (split_roles(bars)) {
    const int hk = h / p.group;
    produce<D, L>(base, bars, map_q, &map_do, s.q0 + m0, h, map_k, map_v, batch, n_blocks,
                  [&](int n, int64_t& row, int& head) {
                    row = s.k0 + int64_t(n) * kKeys;
                    head = hk;
                  });
    return;
  }
  const int t = threadIdx.x - 128, wg = t / 128, lane = t % 32;
  const int qi[2] = {m0 + 64 * wg + acc_row(0, t), m0 + 64 * wg + acc_row(1, t)};
  const int bh = b * p.heads + h;
  const int diag = m0 + s.len_k - s.len_q;
  float lse[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool in = qi[r] < s.len_q;
    const int64_t at = b * p.lse_b + h * p.lse_h + s.q0 + qi[r];
    lse[r] = in ? p.lse[at] : INFINITY;
    delta[r] = in ? p.delta[at] : 0.0f;
  }
  const uint32_t q_tile = base, do_tile = base + L::kFixedBytes;
  float dq[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dq[i] = 0.0f;
  const auto k_tile = [&](int n) { return base + L::kStream0 + (n % L::kStages) * L::kStreamBytes; };
  const auto v_tile = [&](int n) { return base + L::kStream1 + (n % L::kStages) * L::kStreamBytes; };
  uint32_t da[kKeys / 16][4];  // dS of the block whose dQ += dS K is issued next

  // S = Q K^T and dP = dO V^T for block n (sc, dp: accumulators, zero-initialized).
  const auto issue_s_dp = [&](float(&sc)[kKeys / 2], float(&dp)[kKeys / 2], int n) {
    issue_abt<T, kKeys, D>(sc, q_tile, kRows, 64 * wg, k_tile(n));
    issue_abt<T, kKeys, D>(dp, do_tile, kRows, 64 * wg, v_tile(n));
    wgmma_commit();
  };
  // Block n's dS = P (dP - delta), in place of the scores.
  const auto scores_to_ds = [&](float(&sc)[kKeys / 2], const float(&dp)[kKeys / 2], int n) {
    const int n0 = n * kKeys;
    const bool edge = p.key_mask != nullptr || n0 + kKeys > s.len_k || (p.causal && n0 + kKeys - 1 > diag);
#pragma unroll
    for (int i = 0; i < kKeys / 2; ++i) {
      const int kj = n0 + acc_col(i, lane), r = acc_half(i);
      const float pr = (!edge || allowed(p, b, s, qi[r], kj)) ? exp2f(sc[i] * p.scale2 - lse[r]) : 0.0f;
      float d = dp[i];
      if (p.p_drop > 0.0f) d = kept(p, bh, qi[r], kj) ? d * p.keep_scale : 0.0f;
      sc[i] = pr * (d - delta[r]);
    }
  };
  // dQ += dS K for block n, K MN-major (uses da: it must not change until the product is waited).
  const auto issue_dq = [&](int n) {
#pragma unroll
    for (int j = 0; j < kKeys / 16; ++j) wgmma_rs<T, D>(dq, da[j], mn_major(k_tile(n), kKeys, j), 1);
    wgmma_commit();
  };

  // As the forward: block n's S and dP are issued together with block n - 1's dQ += dS K, and
  // block n's dS is computed while that product is in flight (the first block peeled off).
  // Block n's stage has landed, and rows past a packed sequence's keys are zeros.
  const auto wait_block = [&](int n) {
    bars.wait_full(n);
    if (p.cu_k && (n + 1) * kKeys > s.len_k) zero_rows_past_end<D>(k_tile(n), v_tile(n), kKeys, s.len_k - n * kKeys, t);
  };
  bars.wait_fixed();
  if (n_blocks > 0) {
    wait_block(0);
    float sc[kKeys / 2], dp[kKeys / 2];
    wgmma_begin(sc, dp);
    issue_s_dp(sc, dp, 0);
    wgmma_wait<0>();
    reg_fence(sc);
    reg_fence(dp);
    scores_to_ds(sc, dp, 0);
    a_fragments<T, kKeys>(sc, da);
  }
  for (int n = 1; n < n_blocks; ++n) {
    wait_block(n);
    float sc[kKeys / 2], dp[kKeys / 2];
    wgmma_begin(sc, dp, dq);
    issue_s_dp(sc, dp, n);
    issue_dq(n - 1);
    wgmma_wait<1>();  // S and dP have landed; dQ's product may still be in flight
    reg_fence(sc);
    reg_fence(dp);
    scores_to_ds(sc, dp, n);
    wgmma_wait<0>();
    reg_fence(dq);
    bars.release(n - 1);  // this thread is done with block n - 1's stage
    a_fragments<T, kKeys>(sc, da);
  }
  if (n_blocks > 0) {
    wgmma_begin(dq);
    issue_dq(n_blocks - 1);
    wgmma_wait<0>();
    reg_fence(dq);
    bars.release(n_blocks - 1);
  }
  store_acc<T, D>(dq, p.scale, rows<T>(p.dq, b, s.q0, h), p.dq.s, m0 + 64 * wg, s.len_q, t);
#else
  __trap();
#endif
}

// The primitives above, one at a time (see wgmma_probe in attention.h): one warpgroup, its
// thread 0 issuing the copies; raw gets Q's tile as it landed, s = Q K^T over K's first 64 rows
// and s_wide over all 128 (issue_abt: SS, K-major, N = 64 as in the backward and 128 as in the
// forward), o = P V with P = s in T (a_fragments) and V's first 64 rows MN-major (RS).
template <typename T, int D>
__global__ void __launch_bounds__(128, 1)
    attention_probe_wgmma_kernel(const __grid_constant__ Map map_q, const __grid_constant__ Map map_k,
                                 const __grid_constant__ Map map_k_wide, const __grid_constant__ Map map_v, T* raw,
                                 float* s, float* s_wide, float* o) {
#ifdef FUSEDLM_SM90_DEVICE
  constexpr int kTile = 64 * D * 2;  // Q, K's first 64 rows, V's; then K's 128 rows
  const uint32_t base = aligned_base(), bar = base + 5 * kTile;
  const int t = threadIdx.x;
  if (t == 0) {
    bar_init(bar, 1);
    fence_barrier_init();
  }
  __syncthreads();
  if (t == 0) {
    bar_expect(bar, 5 * kTile);
    tma_tile<D>(base, map_q, 64, 0, 0, 0, bar);
    tma_tile<D>(base + kTile, map_k, 64, 0, 0, 0, bar);
    tma_tile<D>(base + 2 * kTile, map_v, 64, 0, 0, 0, bar);
    tma_tile<D>(base + 3 * kTile, map_k_wide, 128, 0, 0, 0, bar);
  }
  bar_wait(bar, 0);
  const T* tile = smem_ptr<const T>(base);
  for (int i = t; i < 64 * D; i += 128) raw[i] = tile[i];
  float sc[32];
  wgmma_begin(sc);
  issue_abt<T, 64, D>(sc, base, 64, 0, base + kTile);
  wgmma_end(sc);
  store_acc_f32<64>(sc, s, t);
  {
    float wide[64];
    wgmma_begin(wide);
    issue_abt<T, 128, D>(wide, base, 64, 0, base + 3 * kTile);
    wgmma_end(wide);
    store_acc_f32<128>(wide, s_wide, t);
  }
  uint32_t pa[4][4];
  a_fragments<T, 64>(sc, pa);
  float acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc[i] = 0.0f;
  wgmma_begin(acc);
#pragma unroll
  for (int j = 0; j < 4; ++j) wgmma_rs<T, D>(acc, pa[j], mn_major(base + 2 * kTile, 64, j), 1);
  wgmma_end(acc);
  store_acc_f32<D>(acc, o, t);
#else
  __trap();
#endif
}

// ---- host side ----------------------------------------------------------------------------

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

// The driver's cuTensorMapEncodeTiled, reached through the runtime (the module links no libcuda).
EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    cuda_check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found),
               "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
#else
    cuda_check(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &found),
               "cudaGetDriverEntryPoint(cuTensorMapEncodeTiled)");
#endif
    if (found != cudaDriverEntryPointSuccess || f == nullptr)
      throw std::runtime_error("the CUDA driver has no cuTensorMapEncodeTiled (needs CUDA 12 or later)");
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// The (rows, heads, batch) extents of a q-like or k-like operand: packed sequences are one batch.
struct Extents {
  int64_t rows, heads, batch;
};

Extents extents(const TensorView& t, bool varlen) {
  return varlen ? Extents{t.shape[0], t.shape[1], 1} : Extents{t.shape[1], t.shape[2], t.shape[0]};
}

// Strides TMA can step: 16-byte aligned, and positive wherever the extent exceeds 1.
bool tma_ready(const Operand& t, const Extents& e) {
  return aligned16(t) && (e.rows <= 1 || t.s > 0) && (e.heads <= 1 || t.h > 0) && (e.batch <= 1 || t.b > 0);
}

// A 4-d tensor map over t's (row, head, batch) x D, boxes of (box_rows x 64), 128-byte swizzle;
// its dims 1..3 ordered by stride (recorded in the order). Dims of extent 1 go last, with a
// stride that is never stepped.
Map tensor_map(const Operand& t, const Extents& e, int head_dim, bool bf16, int box_rows) {
  struct Dim {
    int64_t extent, stride;
    int which;  // 0 row, 1 head, 2 batch
  };
  std::array<Dim, 3> dims{{{e.rows, t.s, 0}, {e.heads, t.h, 1}, {e.batch, t.b, 2}}};
  std::stable_sort(dims.begin(), dims.end(), [](const Dim& x, const Dim& y) {
    return (x.extent > 1 ? x.stride : INT64_MAX) < (y.extent > 1 ? y.stride : INT64_MAX);
  });
  int64_t reach = head_dim;  // elements spanned by the dims so far
  for (Dim& d : dims) {
    if (d.extent == 1) d.stride = (reach + 7) / 8 * 8;
    reach = std::max(reach, d.stride * d.extent);
  }
  Map m{};
  cuuint64_t size[4] = {cuuint64_t(head_dim), 0, 0, 0}, stride[3];
  cuuint32_t box[4] = {64, 1, 1, 1}, step[4] = {1, 1, 1, 1};
  for (int i = 0; i < 3; ++i) {
    size[i + 1] = cuuint64_t(dims[i].extent);
    stride[i] = cuuint64_t(dims[i].stride) * 2;
    if (dims[i].which == 0) box[i + 1] = cuuint32_t(box_rows);
    (dims[i].which == 0 ? m.order.row : dims[i].which == 1 ? m.order.head : m.order.batch) = i + 1;
  }
  const CUresult err = encode_tiled()(&m.map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                                      4, t.p, size, stride, box, step, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (err != CUDA_SUCCESS)
    throw std::runtime_error("cuTensorMapEncodeTiled failed with CUresult " + std::to_string(int(err)));
  return m;
}

template <typename Kernel>
void allow_smem(Kernel kernel, int bytes, const char* what) {
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), what);
}

unsigned blocks_of(int64_t n, int block) { return static_cast<unsigned>((n + block - 1) / block); }

template <typename T, int D>
void run_forward(const Problem& pr, const Params& p, cudaStream_t stream) {
  const bool varlen = pr.cu_q.has_value(), bf16 = std::is_same<T, __nv_bfloat16>::value;
  const Extents eq = extents(pr.q, varlen), ek = extents(pr.k, varlen);
  const Map mq = tensor_map(p.q, eq, D, bf16, 128), mk = tensor_map(p.k, ek, D, bf16, 128),
            mv = tensor_map(p.v, ek, D, bf16, 128);
  const dim3 grid(blocks_of(pr.max_q, 128), unsigned(eq.heads), unsigned(batch_of(pr)));
  if (grid.x == 0 || grid.z == 0) return;
  const auto kernel = attention_fwd_wgmma_kernel<T, D>;
  allow_smem(kernel, FwdRing<D>::kBytes, "cudaFuncSetAttribute (wgmma attention forward)");
  launch_kernel(kernel, grid, kThreads, FwdRing<D>::kBytes, stream, "wgmma attention forward launch", mq, mk, mv, p);
}

template <typename T, int D>
void run_backward(const Problem& pr, const Params& p, cudaStream_t stream) {
  const bool varlen = pr.cu_q.has_value(), bf16 = std::is_same<T, __nv_bfloat16>::value;
  const Extents eq = extents(pr.q, varlen), ek = extents(pr.k, varlen);
  const unsigned batch = unsigned(batch_of(pr));
  if (batch == 0) return;
  // dK/dV streams 64-row Q and dO blocks past 128-row K and V tiles; dQ the other way round.
  {
    const Map mq = tensor_map(p.q, eq, D, bf16, 64), mdo = tensor_map(p.dout, eq, D, bf16, 64),
              mk = tensor_map(p.k, ek, D, bf16, 128), mv = tensor_map(p.v, ek, D, bf16, 128);
    const dim3 grid(blocks_of(pr.max_k, 128), unsigned(ek.heads), batch);
    const auto kernel = attention_bwd_dkdv_wgmma_kernel<T, D>;
    if (grid.x > 0) {
      allow_smem(kernel, DkdvRing<D>::kBytes, "cudaFuncSetAttribute (wgmma attention dK/dV)");
      launch_kernel(kernel, grid, kThreads, DkdvRing<D>::kBytes, stream, "wgmma attention dK/dV launch", mq, mk,
                    mv, mdo, p);
    }
  }
  {
    const Map mq = tensor_map(p.q, eq, D, bf16, 128), mdo = tensor_map(p.dout, eq, D, bf16, 128),
              mk = tensor_map(p.k, ek, D, bf16, 64), mv = tensor_map(p.v, ek, D, bf16, 64);
    const dim3 grid(blocks_of(pr.max_q, 128), unsigned(eq.heads), batch);
    const auto kernel = attention_bwd_dq_wgmma_kernel<T, D>;
    if (grid.x > 0) {
      allow_smem(kernel, DqRing<D>::kBytes, "cudaFuncSetAttribute (wgmma attention dQ)");
      launch_kernel(kernel, grid, kThreads, DqRing<D>::kBytes, stream, "wgmma attention dQ launch", mq, mk, mv,
                    mdo, p);
    }
  }
}

// Why device `device_id` cannot run sm_90a code ("" when it can).
std::string sm90a_unavailable(int device_id) {
#ifndef FUSEDLM_HAS_SM90A
  (void)device_id;
  return "this build has no sm_90a code (FUSEDLM_CUDA_ARCHS lacks 90a)";
#else
  int major = 0, minor = 0;
  cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_id), "cudaDeviceGetAttribute");
  cuda_check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device_id), "cudaDeviceGetAttribute");
  if (major != 9 || minor != 0)
    return "needs a compute capability 9.0 GPU (sm_90a), got " + std::to_string(major) + "." + std::to_string(minor);
  return "";
#endif
}

template <bool kBackward>
void dispatch_wgmma(const Problem& pr, const Params& p, std::uintptr_t stream) {
  DeviceGuard guard(pr.q.device_id);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int64_t d = pr.q.shape[pr.q.ndim - 1];
  with_half_type(pr.q.dtype, "the wgmma attention", [&](auto t) {
    using T = decltype(t);
    if (d == 64) return kBackward ? run_backward<T, 64>(pr, p, st) : run_forward<T, 64>(pr, p, st);
    return kBackward ? run_backward<T, 128>(pr, p, st) : run_forward<T, 128>(pr, p, st);
  });
}

}  // namespace

namespace detail {

std::string wgmma_unavailable(const Problem& pr, const Params& p, bool backward) {
  const std::string why = sm90a_unavailable(pr.q.device_id);
#ifndef FUSEDLM_HAS_SM90A
  (void)p;
  (void)backward;
  return why;
#else
  if (!why.empty()) return why;
  const int64_t d = pr.q.shape[pr.q.ndim - 1];
  if (d != 64 && d != 128) return "head dim " + std::to_string(d) + " (the wgmma kernels have 64 and 128)";
  const bool varlen = pr.cu_q.has_value();
  const Extents eq = extents(pr.q, varlen), ek = extents(pr.k, varlen);
  bool ok = tma_ready(p.q, eq) && tma_ready(p.k, ek) && tma_ready(p.v, ek);
  ok = ok && (backward ? tma_ready(p.dout, eq) && aligned16(p.dq) && aligned16(p.dk) && aligned16(p.dv)
                       : aligned16(p.o));
  if (!ok) return "every operand needs 16-byte aligned pointers and strides";
  return "";
#endif
}

void launch_forward_wgmma(const Problem& pr, const Params& p, std::uintptr_t stream) {
  dispatch_wgmma<false>(pr, p, stream);
}

void launch_backward_wgmma(const Problem& pr, const Params& p, std::uintptr_t stream) {
  dispatch_wgmma<true>(pr, p, stream);
}

}  // namespace detail

void launch_wgmma_probe(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& raw,
                        const TensorView& s, const TensorView& s_wide, const TensorView& o, std::uintptr_t stream) {
  const std::string why = sm90a_unavailable(q.device_id);
  if (!why.empty()) throw ArgError("the wgmma probe " + why);
  DeviceGuard guard(q.device_id);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const bool bf16 = q.dtype == DType::kBFloat16;
  const Extents one_tile{64, 1, 1}, two_tiles{128, 1, 1};
  with_half_type(q.dtype, "the wgmma probe", [&](auto t) {
    using T = decltype(t);
    const auto run = [&](auto head_dim) {
      constexpr int D = decltype(head_dim)::value;
      constexpr int kBytes = 5 * 64 * D * 2 + 8 + 1024;  // five 64-row tiles, a barrier, alignment slack
      const Map mq = tensor_map(operand(q, true), one_tile, D, bf16, 64),
                mk = tensor_map(operand(k, true), two_tiles, D, bf16, 64),
                mk_wide = tensor_map(operand(k, true), two_tiles, D, bf16, 128),
                mv = tensor_map(operand(v, true), one_tile, D, bf16, 64);
      const auto kernel = attention_probe_wgmma_kernel<T, D>;
      allow_smem(kernel, kBytes, "cudaFuncSetAttribute (wgmma probe)");
      launch_kernel(kernel, dim3(1), 128, kBytes, st, "wgmma probe launch", mq, mk, mk_wide, mv,
                    static_cast<T*>(raw.data), static_cast<float*>(s.data), static_cast<float*>(s_wide.data),
                    static_cast<float*>(o.data));
    };
    if (q.shape[2] == 64)
      run(std::integral_constant<int, 64>{});
    else
      run(std::integral_constant<int, 128>{});
  });
}
}  // namespace fusedlm::attention

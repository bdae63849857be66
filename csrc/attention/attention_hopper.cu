// Attention forward for Hopper (sm_90a): wgmma tensor-core matrix products and the bulk tensor
// copy engine (TMA), in the FlashAttention-3 arrangement. The same algorithm and results as the
// WMMA kernel (attention_kernels.cu): base-2 online softmax, the base-2 log-sum-exp saved for
// the backward (which stays on the WMMA kernels), the same masks and the same dropout draws.
//
// A CTA owns 128 query rows of one head and is three warpgroups:
// - a producer (one thread of warpgroup 0) streams Q once, then K and V blocks of 128 keys
//   through a two-stage ring of shared memory with TMA, each stage completing on an mbarrier;
// - two consumers (warpgroups 1 and 2), 64 query rows each: S = Q K^T with both operands in
//   shared memory, the softmax on the fp32 accumulators in registers, then O += P V with P taken
//   straight from registers (the accumulator layout of S is the A-fragment layout of P V) and V
//   read MN-major (the transpose bit), so nothing is rewritten in shared memory. Each consumer
//   thread arrives on the stage's "empty" barrier once its products are done.
// setmaxnreg moves registers from the producer to the consumers. Tiles are 64 columns (128 B)
// wide, TMA's 128-byte swizzle; a head dim of 128 is two such tiles side by side.
//
// Covers head dims 64 and 128, fp16 and bf16, 16-byte aligned operands; launch_forward_wgmma
// says why it declines anything else, and the WMMA kernel serves it.
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
#include "attention.h"
#include "attention_device.cuh"

namespace fusedlm::attention {
namespace {

using namespace detail;

constexpr int kBlockM = 128;  // query rows per CTA: 64 per consumer warpgroup
constexpr int kBlockN = 128;  // keys per block
constexpr int kStages = 2;    // K/V blocks in flight
constexpr int kThreads = 384;
constexpr int kRowBytes = 128;  // a tile row: 64 two-byte elements, one 128-byte swizzle span
constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 40 * 128 + 232 * 256 <= 65536
static_assert(kProducerRegs * 128 + kConsumerRegs * 256 <= 65536, "register file");

// Shared memory, from a 1024-byte aligned base (the 128-byte swizzle repeats every 1024 bytes,
// and the wgmma descriptors below assume tiles start on that boundary). A (rows x D) tile is
// D / 64 column slabs of (rows x 64), each slab's rows 128 bytes apart.
template <int D>
struct Smem {
  static constexpr int kSlabs = D / 64;
  static constexpr int kQBytes = kBlockM * D * 2;
  static constexpr int kKVBytes = kBlockN * D * 2;  // one block of K (or of V)
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kQBytes;             // stage s at kK + s * kKVBytes
  static constexpr int kV = kK + kStages * kKVBytes;  // stage s at kV + s * kKVBytes
  static constexpr int kBars = kV + kStages * kKVBytes;  // q, full[kStages], empty[kStages]
  static constexpr int kBytes = kBars + 8 * (1 + 2 * kStages) + 1024;  // + alignment slack
};

// Where the row, head and batch coordinates go among a tensor map's dims 1..3 (dim 0 is the
// head dim); the host orders the dims by stride.
struct MapOrder {
  int row, head, batch;
};

struct Orders {
  MapOrder q, k, v;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void bar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

// Arrives once and tells the barrier to expect `bytes` more from the copy engine.
__device__ __forceinline__ void bar_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void bar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void bar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile(
        "{.reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p;}"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
}

// Rows [row, row + box) of columns [col, col + 64) of (head, batch) into shared memory at dst;
// rows past the tensor's end arrive as zeros. Completes on `bar`.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, MapOrder o, int col, int row,
                                         int head, int batch, uint32_t bar) {
  const auto at = [&](int dim) { return o.row == dim ? row : o.head == dim ? head : batch; };
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(at(1)), "r"(at(2)), "r"(at(3)), "r"(bar)
      : "memory");
}

// A wgmma shared-memory matrix descriptor, 128-byte swizzle. K-major operands (Q, K): `sbo` is
// the distance between 8-row groups (1024) and `lbo` is unused. MN-major (V, keys along K):
// `sbo` is the distance between 8-key groups and `lbo` the distance between 64-column slabs.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }

// Keeps the compiler from moving reads or writes of accumulators across an asynchronous product.
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// The wgmma forms used: SS (A and B descriptors) with N = 128, RS (A in registers, B MN-major)
// with N = 64 or 128; fp32 accumulators d[N / 2]; scale_d = 0 overwrites, 1 accumulates.
#define FUSEDLM_WGMMA_RS_N64(TY) \
  asm volatile("{.reg .pred p; setp.ne.b32 p, %37, 0; " \
  "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, " \
  "{%32,%33,%34,%35}, %36, p, 1, 1, 1;}\n" \
  : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]) \
  , "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
  , "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]) \
  , "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d))

#define FUSEDLM_WGMMA_SS_N128(TY) \
  asm volatile("{.reg .pred p; setp.ne.b32 p, %66, 0; " \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, " \
  "%64, %65, p, 1, 1, 0, 0;}\n" \
  : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]) \
  , "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
  , "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]) \
  , "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
  , "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]) \
  , "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]) \
  , "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]) \
  , "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
  : "l"(a), "l"(b), "r"(scale_d))

#define FUSEDLM_WGMMA_RS_N128(TY) \
  asm volatile("{.reg .pred p; setp.ne.b32 p, %69, 0; " \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, " \
  "{%64,%65,%66,%67}, %68, p, 1, 1, 1;}\n" \
  : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]) \
  , "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
  , "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]) \
  , "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
  , "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]) \
  , "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]) \
  , "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]) \
  , "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d))


template <typename T>
struct Wgmma;

#define FUSEDLM_WGMMA_FORMS(T, TY)                                                                  \
  template <>                                                                                       \
  struct Wgmma<T> {                                                                                 \
    static __device__ __forceinline__ void ss128(float (&d)[64], uint64_t a, uint64_t b, int scale_d) { \
      FUSEDLM_WGMMA_SS_N128(TY);                                                                    \
    }                                                                                               \
    static __device__ __forceinline__ void rs64(float (&d)[32], const uint32_t (&a)[4], uint64_t b,   \
                                                int scale_d) {                                      \
      FUSEDLM_WGMMA_RS_N64(TY);                                                                     \
    }                                                                                               \
    static __device__ __forceinline__ void rs128(float (&d)[64], const uint32_t (&a)[4], uint64_t b,  \
                                                 int scale_d) {                                     \
      FUSEDLM_WGMMA_RS_N128(TY);                                                                    \
    }                                                                                               \
  };
FUSEDLM_WGMMA_FORMS(__nv_bfloat16, "bf16")
FUSEDLM_WGMMA_FORMS(__half, "f16")
#undef FUSEDLM_WGMMA_FORMS

// Two fp32 values rounded into one register of the storage dtype (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Accumulator layout of a wgmma m64nN (per warpgroup): warp w holds rows 16w..16w+15; lane l
// holds, for each 8-column chunk c, d[4c], d[4c+1] at row l / 4, columns 8c + 2 (l % 4) + {0, 1},
// and d[4c+2], d[4c+3] at row l / 4 + 8. A thread therefore owns two rows; the four lanes of a
// quad share them (row max and sum: two shuffles).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    attention_fwd_wgmma_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                               const __grid_constant__ CUtensorMap map_v, const Params p, const Orders ord) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Smem<D>;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t bar_q = base + L::kBars, bar_full = bar_q + 8, bar_empty = bar_full + 8 * kStages;

  const int b = blockIdx.z, h = blockIdx.y;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;  // longest (causal) blocks first
  const Seq s = seq_of(p, b);
  if (m0 >= s.len_q) return;
  int n_end = s.len_k;
  if (p.causal) n_end = min(n_end, m0 + kBlockM + s.len_k - s.len_q);
  const int n_blocks = n_end > 0 ? (n_end + kBlockN - 1) / kBlockN : 0;
  const int batch = p.cu_q ? 0 : b;  // packed sequences: one batch of total rows

  if (threadIdx.x == 0) {
    bar_init(bar_q, 1);
    for (int st = 0; st < kStages; ++st) {
      bar_init(bar_full + 8 * st, 1);
      bar_init(bar_empty + 8 * st, 256);  // every consumer thread
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (threadIdx.x < 128) {  // producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kProducerRegs));
    if (threadIdx.x == 0) {
      const int hk = h / p.group;
      bar_expect(bar_q, L::kQBytes);
#pragma unroll
      for (int sl = 0; sl < L::kSlabs; ++sl)
        tma_load(base + L::kQ + sl * kBlockM * kRowBytes, &map_q, ord.q, 64 * sl, int(s.q0) + m0, h, batch, bar_q);
      for (int n = 0; n < n_blocks; ++n) {
        const int st = n % kStages;
        if (n >= kStages) bar_wait(bar_empty + 8 * st, ((n / kStages) - 1) & 1);
        bar_expect(bar_full + 8 * st, 2 * L::kKVBytes);
        const int row = int(s.k0) + n * kBlockN;
#pragma unroll
        for (int sl = 0; sl < L::kSlabs; ++sl) {
          const uint32_t off = st * L::kKVBytes + sl * kBlockN * kRowBytes;
          tma_load(base + L::kK + off, &map_k, ord.k, 64 * sl, row, hk, batch, bar_full + 8 * st);
          tma_load(base + L::kV + off, &map_v, ord.v, 64 * sl, row, hk, batch, bar_full + 8 * st);
        }
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kConsumerRegs));

  const int t = threadIdx.x - 128, wg = t / 128, warp = (t % 128) / 32, lane = t % 32;
  const int row0 = wg * 64 + warp * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8
  const int qi[2] = {m0 + row0, m0 + row0 + 8};
  const int col0 = 2 * (lane % 4);
  const int bh = b * p.heads + h;
  // Does a key block need the per-element mask? Past the keys' end, a padding mask, or across
  // the causal diagonal of this CTA's first row.
  const int diag = m0 + s.len_k - s.len_q;  // the last key row m0 may see (causal)

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.0f, 0.0f};
  const uint32_t q_tile = base + L::kQ + wg * 64 * kRowBytes;

  bar_wait(bar_q, 0);
  for (int n = 0; n < n_blocks; ++n) {
    const int st = n % kStages, n0 = n * kBlockN;
    const uint32_t k_tile = base + L::kK + st * L::kKVBytes, v_tile = base + L::kV + st * L::kKVBytes;
    bar_wait(bar_full + 8 * st, (n / kStages) & 1);

    float sc[kBlockN / 2];
    reg_fence(sc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {  // 16 columns of the head dim per step
      const uint32_t off = (kk % 4) * 32;  // 32 bytes further within the 128-byte span
      Wgmma<T>::ss128(sc, smem_desc(q_tile + (kk / 4) * kBlockM * kRowBytes + off, 16, 1024),
                      smem_desc(k_tile + (kk / 4) * kBlockN * kRowBytes + off, 16, 1024), kk > 0);
    }
    wgmma_commit();
    wgmma_wait_all();
    reg_fence(sc);

    const bool edge = n0 + kBlockN > s.len_k || p.key_mask != nullptr || (p.causal && n0 + kBlockN - 1 > diag);
    float mx[2] = {m_i[0], m_i[1]};
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) {
      const int r = (i % 4) / 2, j = n0 + 8 * (i / 4) + col0 + i % 2;
      float x = sc[i] * p.scale2;
      if (edge && !allowed(p, b, s, qi[r], j)) x = -INFINITY;
      sc[i] = x;
      mx[r] = fmaxf(mx[r], x);
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      // Nothing allowed yet: keep m at -inf and add zeros (no inf - inf).
      alpha[r] = mx[r] == -INFINITY ? 1.0f : exp2f(m_i[r] - mx[r]);
      m_i[r] = mx[r];
      l_i[r] *= alpha[r];
    }
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i % 4) / 2];
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) {
      const int r = (i % 4) / 2;
      float pr = m_i[r] == -INFINITY ? 0.0f : exp2f(sc[i] - m_i[r]);
      l_i[r] += pr;  // the normalizer sums every probability, dropped or not
      if (p.p_drop > 0.0f) {
        const int j = n0 + 8 * (i / 4) + col0 + i % 2;
        pr = kept(p, bh, qi[r], j) ? pr / p.keep : 0.0f;
      }
      sc[i] = pr;
    }
    // P as the A operand: 16 keys (two 8-column chunks) per k-step.
    uint32_t pa[kBlockN / 16][4];
#pragma unroll
    for (int j = 0; j < kBlockN / 16; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) pa[j][e] = pack2<T>(sc[8 * j + 2 * e], sc[8 * j + 2 * e + 1]);

    reg_fence(o);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < kBlockN / 16; ++j) {  // V rows 16j..16j+15: 16 slab rows further per step
      const uint64_t dv = smem_desc(v_tile + j * 16 * kRowBytes, kBlockN * kRowBytes, 8 * kRowBytes);
      if constexpr (D == 64) Wgmma<T>::rs64(o, pa[j], dv, 1);
      else Wgmma<T>::rs128(o, pa[j], dv, 1);
    }
    wgmma_commit();
    wgmma_wait_all();
    reg_fence(o);
    bar_arrive(bar_empty + 8 * st);  // this thread is done with the stage
  }

  T* out = rows<T>(p.o, b, s.q0, h);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_i[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (qi[r] >= s.len_q) continue;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // a row that saw no key gives zeros
#pragma unroll
    for (int c = 0; c < D / 8; ++c)
      *reinterpret_cast<uint32_t*>(out + int64_t(qi[r]) * p.o.s + 8 * c + col0) =
          pack2<T>(o[4 * c + 2 * r] * inv, o[4 * c + 2 * r + 1] * inv);
    // +inf for a row that saw no key, as the other kernels write it: exp2(s - lse) is then 0.
    if (lane % 4 == 0)
      p.lse[b * p.lse_b + h * p.lse_h + s.q0 + qi[r]] = l > 0.0f ? m_i[r] + log2f(l) : INFINITY;
  }
#else
  __trap();  // no sm_90a code in this build: the host never launches this kernel then
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

// A 4-d tensor map over t's (row, head, batch) x D, boxes of (box_rows x 64), 128-byte swizzle;
// its dims 1..3 ordered by stride, recorded in `order`. Dims of extent 1 go last, with a
// stride that is never stepped.
CUtensorMap tensor_map(const Operand& t, int64_t n_rows, int64_t heads, int64_t batch, int head_dim, bool bf16,
                       int box_rows, MapOrder& order) {
  struct Dim {
    int64_t extent, stride;
    int which;  // 0 row, 1 head, 2 batch
  };
  std::array<Dim, 3> dims{{{n_rows, t.s, 0}, {heads, t.h, 1}, {batch, t.b, 2}}};
  std::stable_sort(dims.begin(), dims.end(), [](const Dim& x, const Dim& y) {
    return (x.extent > 1 ? x.stride : INT64_MAX) < (y.extent > 1 ? y.stride : INT64_MAX);
  });
  int64_t reach = head_dim;  // elements spanned by the dims so far
  for (Dim& d : dims) {
    if (d.extent == 1) d.stride = (reach + 7) / 8 * 8;
    reach = std::max(reach, d.stride * d.extent);
  }
  cuuint64_t size[4] = {cuuint64_t(head_dim), 0, 0, 0}, stride[3];
  cuuint32_t box[4] = {64, 1, 1, 1}, step[4] = {1, 1, 1, 1};
  for (int i = 0; i < 3; ++i) {
    size[i + 1] = cuuint64_t(dims[i].extent);
    stride[i] = cuuint64_t(dims[i].stride) * 2;
    if (dims[i].which == 0) box[i + 1] = cuuint32_t(box_rows);
    (dims[i].which == 0 ? order.row : dims[i].which == 1 ? order.head : order.batch) = i + 1;
  }
  CUtensorMap map;
  const CUresult err = encode_tiled()(&map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                                      4, t.p, size, stride, box, step, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (err != CUDA_SUCCESS)
    throw std::runtime_error("cuTensorMapEncodeTiled failed with CUresult " + std::to_string(int(err)));
  return map;
}

// Strides TMA can step: 16-byte aligned, and positive wherever the extent exceeds 1.
bool tma_ready(const Operand& t, int64_t n_rows, int64_t heads, int64_t batch) {
  return aligned16(t) && (n_rows <= 1 || t.s > 0) && (heads <= 1 || t.h > 0) && (batch <= 1 || t.b > 0);
}

template <typename T, int D>
void run_wgmma(const ForwardArgs& a, const Params& p, cudaStream_t stream) {
  const Problem& pr = a.p;
  const bool varlen = pr.cu_q.has_value(), bf16 = std::is_same<T, __nv_bfloat16>::value;
  const int hd = varlen ? 1 : 2;
  const int64_t batch = varlen ? 1 : pr.q.shape[0];
  const int64_t rows_q = varlen ? pr.q.shape[0] : pr.q.shape[1], rows_k = varlen ? pr.k.shape[0] : pr.k.shape[1];
  Orders ord{};
  const CUtensorMap mq = tensor_map(p.q, rows_q, pr.q.shape[hd], batch, D, bf16, kBlockM, ord.q);
  const CUtensorMap mk = tensor_map(p.k, rows_k, pr.k.shape[hd], batch, D, bf16, kBlockN, ord.k);
  const CUtensorMap mv = tensor_map(p.v, rows_k, pr.v.shape[hd], batch, D, bf16, kBlockN, ord.v);
  const dim3 grid(static_cast<unsigned>((pr.max_q + kBlockM - 1) / kBlockM), static_cast<unsigned>(pr.q.shape[hd]),
                  static_cast<unsigned>(batch_of(pr)));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  const auto kernel = attention_fwd_wgmma_kernel<T, D>;
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem<D>::kBytes),
             "cudaFuncSetAttribute (wgmma attention shared memory)");
  kernel<<<grid, kThreads, Smem<D>::kBytes, stream>>>(mq, mk, mv, p, ord);
  cuda_check(cudaGetLastError(), "wgmma attention kernel launch");
}

}  // namespace

namespace detail {

std::string wgmma_unavailable(const ForwardArgs& a, const Params& p) {
#ifndef FUSEDLM_HAS_SM90A
  (void)a;
  (void)p;
  return "this build has no sm_90a code (FUSEDLM_CUDA_ARCHS lacks 90a)";
#else
  int major = 0, minor = 0;
  cuda_check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, a.p.q.device_id), "cudaDeviceGetAttribute");
  cuda_check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, a.p.q.device_id), "cudaDeviceGetAttribute");
  if (major != 9 || minor != 0)
    return "needs a compute capability 9.0 GPU (sm_90a), got " + std::to_string(major) + "." + std::to_string(minor);
  const int64_t d = a.p.q.shape[a.p.q.ndim - 1];
  if (d != 64 && d != 128) return "head dim " + std::to_string(d) + " (the wgmma kernel has 64 and 128)";
  const bool varlen = a.p.cu_q.has_value();
  const int hd = varlen ? 1 : 2;
  const int64_t batch = varlen ? 1 : a.p.q.shape[0];
  const int64_t rows_q = varlen ? a.p.q.shape[0] : a.p.q.shape[1], rows_k = varlen ? a.p.k.shape[0] : a.p.k.shape[1];
  if (!tma_ready(p.q, rows_q, a.p.q.shape[hd], batch) || !tma_ready(p.k, rows_k, a.p.k.shape[hd], batch) ||
      !tma_ready(p.v, rows_k, a.p.v.shape[hd], batch) || !aligned16(p.o))
    return "q, k, v and out need 16-byte aligned pointers and strides";
  return "";
#endif
}

void launch_forward_wgmma(const ForwardArgs& a, const Params& p, std::uintptr_t stream) {
  DeviceGuard guard(a.p.q.device_id);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int64_t d = a.p.q.shape[a.p.q.ndim - 1];
  const bool half = a.p.q.dtype == DType::kFloat16;
  if (d == 64) half ? run_wgmma<__half, 64>(a, p, st) : run_wgmma<__nv_bfloat16, 64>(a, p, st);
  else half ? run_wgmma<__half, 128>(a, p, st) : run_wgmma<__nv_bfloat16, 128>(a, p, st);
}

}  // namespace detail

}  // namespace fusedlm::attention

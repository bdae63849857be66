// Hopper's (sm_90a) asynchronous machinery, as the attention kernels of attention_hopper.cu use
// it: mbarriers, tensor copies by the copy engine (TMA), and warpgroup matrix products (wgmma)
// with their shared-memory descriptors. Each wrapper is one PTX instruction; the CPU emulator's
// build (csrc/emu, FUSEDLM_EMULATED) runs the same kernels through its stand-ins instead, which
// follow PTX's documented semantics: an mbarrier's phases, arrival counts and transaction
// bytes; TMA boxes with out-of-range elements zero-filled and the 128-byte swizzle; wgmma's
// fragment layouts and canonical shared-memory layouts, and its asynchrony (a product runs at
// its group's wait, so accumulators read earlier, or a tile released earlier, show).
#pragma once
#include <cstdint>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(FUSEDLM_EMULATED)
// This compilation has sm_90a device code: a GPU build's sm_90a pass, or the emulator.
#define FUSEDLM_SM90_DEVICE 1
#endif

#ifdef FUSEDLM_SM90_DEVICE
#include "warp_mma.cuh"  // mma::pack: two values into one register of the storage dtype

namespace fusedlm::hopper {

// The shared-memory window address of a pointer into shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
#ifdef FUSEDLM_EMULATED
  return emu::shared_address(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// ---- mbarriers ------------------------------------------------------------------------------
// A phase completes when `count` arrivals have come and every byte expected of the copy engine
// has landed; waits name the phase by its parity.

__device__ __forceinline__ void bar_init(uint32_t bar, uint32_t count, int line = __builtin_LINE()) {
#ifdef FUSEDLM_EMULATED
  emu::mbar_init(bar, count, line);
#else
  (void)line;
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
#endif
}

// Makes initialized barriers visible to the copy engine (before any copy completes on them).
__device__ __forceinline__ void fence_barrier_init() {
#ifndef FUSEDLM_EMULATED
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// Arrives once and tells the barrier to expect `bytes` more from the copy engine.
__device__ __forceinline__ void bar_expect(uint32_t bar, uint32_t bytes, int line = __builtin_LINE()) {
#ifdef FUSEDLM_EMULATED
  emu::mbar_arrive(bar, bytes, line);
#else
  (void)line;
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
#endif
}

__device__ __forceinline__ void bar_arrive(uint32_t bar, int line = __builtin_LINE()) {
#ifdef FUSEDLM_EMULATED
  emu::mbar_arrive(bar, 0, line);
#else
  (void)line;
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
#endif
}

#ifndef FUSEDLM_EMULATED
__device__ __forceinline__ bool bar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{.reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p;}"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#endif

// Waits for the completion of `bar`'s phase with this parity. (The emulator blocks the thread
// until then, and reports a deadlock naming the line if no thread can make progress.)
__device__ __forceinline__ void bar_wait(uint32_t bar, uint32_t parity, int line = __builtin_LINE()) {
#ifdef FUSEDLM_EMULATED
  emu::mbar_wait(bar, parity, line);
#else
  (void)line;
  while (!bar_try_wait(bar, parity)) {
  }
#endif
}

// No wait lasts more than microseconds in a working kernel; one that lasts kWaitLimitNs means a
// barrier that will never complete (a wrong phase or transaction count, a copy that faulted).
// A producer's waits watch for that and trap, so that the host gets a launch error instead of
// a GPU that hangs; a trap on a consumer's path would make ptxas cap its registers (their
// setmaxnreg region), and the kernels would spill.
constexpr uint64_t kWaitLimitNs = 10'000'000'000ull;

__device__ __forceinline__ void bar_wait_or_trap(uint32_t bar, uint32_t parity, int line = __builtin_LINE()) {
#ifdef FUSEDLM_EMULATED
  emu::mbar_wait(bar, parity, line);  // a barrier that never completes is the emulator's deadlock
#else
  (void)line;
  if (bar_try_wait(bar, parity)) return;
  const uint64_t t0 = global_ns();
  while (!bar_try_wait(bar, parity))
    if (global_ns() - t0 > kWaitLimitNs) __trap();
#endif
}

// ---- TMA --------------------------------------------------------------------------------------

// The box of a 4-d tensor map at coordinates c (innermost first) into shared memory at dst;
// elements outside the tensor arrive as zeros. Completes its bytes on `bar`.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* map, int c0, int c1, int c2, int c3,
                                            uint32_t bar, int line = __builtin_LINE()) {
#ifdef FUSEDLM_EMULATED
  const int c[4] = {c0, c1, c2, c3};
  emu::tma_load(dst, map, c, 4, bar, line);
#else
  (void)line;
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
#endif
}

// ---- ordering -----------------------------------------------------------------------------------

// Makes this thread's ordinary shared-memory stores visible to the async proxy (wgmma's and
// TMA's reads) of the threads that synchronize with it afterwards.
__device__ __forceinline__ void fence_proxy_async() {
#ifndef FUSEDLM_EMULATED
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// A barrier for `threads` threads (whole warps) of the block, by id (1..15: __syncthreads has 0),
// such as the consumer warpgroups without the producer.
__device__ __forceinline__ void named_barrier_sync(int id, int threads, int line = __builtin_LINE()) {
#ifdef FUSEDLM_EMULATED
  emu::named_barrier(id, threads, line);
#else
  (void)line;
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
#endif
}

// Arrives at barrier `id` without waiting (counted toward the `threads` a bar.sync there waits for).
__device__ __forceinline__ void named_barrier_arrive(int id, int threads, int line = __builtin_LINE()) {
#ifdef FUSEDLM_EMULATED
  emu::named_barrier_arrive(id, threads, line);
#else
  (void)line;
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
#endif
}

// ---- registers --------------------------------------------------------------------------------

// Hands registers back (the producer warpgroup) or takes them (the consumers).
template <int kRegs>
__device__ __forceinline__ void regs_dec() {
#ifndef FUSEDLM_EMULATED
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void regs_inc() {
#ifndef FUSEDLM_EMULATED
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
#endif
}

// ---- wgmma ------------------------------------------------------------------------------------

// A shared-memory matrix descriptor with the 128-byte swizzle (PTX's "matrix descriptor
// format"): start address, leading and stride byte offsets, each in 16-byte units.
// K-major: `sbo` is the distance between 8-row groups and `lbo` is unused. MN-major: `lbo` is
// the distance between 64-element column slabs and `sbo` between 8-row groups along K.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() {
#ifndef FUSEDLM_EMULATED
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef FUSEDLM_EMULATED
  emu::wgmma_commit();
#else
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}
// Waits until at most kPending of this thread's committed groups are in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait(int line = __builtin_LINE()) {
#ifdef FUSEDLM_EMULATED
  emu::wgmma_wait(kPending, line);
#else
  (void)line;
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
#endif
}

// Keeps the compiler from moving reads or writes of accumulators across an asynchronous product.
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N]) {
#ifndef FUSEDLM_EMULATED
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
#else
  (void)r;
#endif
}

// Brackets a batch of asynchronous products: wgmma_begin before the first (accumulators and A
// fragments written by ordinary instructions are fenced), wgmma_end after the last (commits and
// waits, after which the accumulators may be read).
template <typename... Acc>
__device__ __forceinline__ void wgmma_begin(Acc&... acc) {
  (reg_fence(acc), ...);
  wgmma_fence();
}
template <typename... Acc>
__device__ __forceinline__ void wgmma_end(Acc&... acc) {
  wgmma_commit();
  wgmma_wait<0>();
  (reg_fence(acc), ...);
}

#ifndef FUSEDLM_EMULATED
// The wgmma forms used, for N = 64 and 128: SS (A and B descriptors, both K-major) and RS (A in
// registers, B MN-major); fp32 accumulators d[N / 2]; scale_d = 0 overwrites, 1 accumulates.
#define FUSEDLM_WGMMA_D32 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define FUSEDLM_WGMMA_D64 FUSEDLM_WGMMA_D32, \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define FUSEDLM_WGMMA_R32 \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define FUSEDLM_WGMMA_R64 \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"
// SS: operands %N/2 (A descriptor), %N/2+1 (B descriptor), %N/2+2 (scale_d).
#define FUSEDLM_WGMMA_SS(NN, REGS, DOUT, A, B, SC, TY) \
  asm volatile("{.reg .pred p; setp.ne.b32 p, " SC ", 0; wgmma.mma_async.sync.aligned.m64n" NN "k16.f32." TY "." TY \
               " " REGS ", " A ", " B ", p, 1, 1, 0, 0;}\n" : DOUT : "l"(a), "l"(b), "r"(scale_d))
// RS: four A registers, then the B descriptor and scale_d; B is MN-major (the last 1).
#define FUSEDLM_WGMMA_RS(NN, REGS, DOUT, A, B, SC, TY) \
  asm volatile("{.reg .pred p; setp.ne.b32 p, " SC ", 0; wgmma.mma_async.sync.aligned.m64n" NN "k16.f32." TY "." TY \
               " " REGS ", " A ", " B ", p, 1, 1, 1;}\n" : DOUT : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), \
               "l"(b), "r"(scale_d))
#endif

template <typename T>
constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;

// d (m64 x N, fp32, the accumulator layout below) = A B (+ d if scale_d), K = 16: SS takes A
// (64 x 16, K-major) and B (N x 16, K-major) from shared memory; RS takes A from registers
// (the A-fragment layout) and B (16 x N, MN-major) from shared memory. T: __half or
// __nv_bfloat16. Asynchronous: d may be read only after wgmma_wait.
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int scale_d,
                                         int line = __builtin_LINE()) {
  static_assert(N == 64 || N == 128, "the wgmma forms here have N = 64 and 128");
#ifdef FUSEDLM_EMULATED
  emu::wgmma(d, N, a, nullptr, b, scale_d != 0, false, kBf16<T>, line);
#else
  (void)line;
  if constexpr (N == 64) {
    if constexpr (kBf16<T>) FUSEDLM_WGMMA_SS("64", FUSEDLM_WGMMA_R32, FUSEDLM_WGMMA_D32, "%32", "%33", "%34", "bf16");
    else FUSEDLM_WGMMA_SS("64", FUSEDLM_WGMMA_R32, FUSEDLM_WGMMA_D32, "%32", "%33", "%34", "f16");
  } else {
    if constexpr (kBf16<T>) FUSEDLM_WGMMA_SS("128", FUSEDLM_WGMMA_R64, FUSEDLM_WGMMA_D64, "%64", "%65", "%66", "bf16");
    else FUSEDLM_WGMMA_SS("128", FUSEDLM_WGMMA_R64, FUSEDLM_WGMMA_D64, "%64", "%65", "%66", "f16");
  }
#endif
}

template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b, int scale_d,
                                         int line = __builtin_LINE()) {
  static_assert(N == 64 || N == 128, "the wgmma forms here have N = 64 and 128");
#ifdef FUSEDLM_EMULATED
  emu::wgmma(d, N, 0, a, b, scale_d != 0, true, kBf16<T>, line);
#else
  (void)line;
  if constexpr (N == 64) {
    if constexpr (kBf16<T>)
      FUSEDLM_WGMMA_RS("64", FUSEDLM_WGMMA_R32, FUSEDLM_WGMMA_D32, "{%32,%33,%34,%35}", "%36", "%37", "bf16");
    else FUSEDLM_WGMMA_RS("64", FUSEDLM_WGMMA_R32, FUSEDLM_WGMMA_D32, "{%32,%33,%34,%35}", "%36", "%37", "f16");
  } else {
    if constexpr (kBf16<T>)
      FUSEDLM_WGMMA_RS("128", FUSEDLM_WGMMA_R64, FUSEDLM_WGMMA_D64, "{%64,%65,%66,%67}", "%68", "%69", "bf16");
    else FUSEDLM_WGMMA_RS("128", FUSEDLM_WGMMA_R64, FUSEDLM_WGMMA_D64, "{%64,%65,%66,%67}", "%68", "%69", "f16");
  }
#endif
}

// Accumulator layout of a wgmma m64nN, per warpgroup: warp w holds rows 16w..16w+15; lane l
// holds, for each 8-column chunk c, d[4c], d[4c+1] at row l / 4, columns 8c + 2 (l % 4) + {0, 1},
// and d[4c+2], d[4c+3] at row l / 4 + 8. So a thread owns two rows (`half` 0 and 1 below), and
// the four lanes of a quad share them: a row's max or sum takes two shuffles.
__device__ __forceinline__ int acc_half(int i) { return (i % 4) / 2; }
__device__ __forceinline__ int acc_col(int i, int lane) { return 8 * (i / 4) + 2 * (lane % 4) + i % 2; }
// Row of half r of thread t (any thread index: its warpgroup's rows are 0..63).
__device__ __forceinline__ int acc_row(int r, int t) { return (t % 128) / 32 * 16 + (t % 32) / 4 + 8 * r; }

// An (m64 x N) accumulator as the A operand of the next product (K = N): 16 columns, two
// 8-column chunks, per k-step. The A-fragment layout (a0..a3: rows l / 4 and l / 4 + 8,
// columns 2 (l % 4) and 8 more) matches the accumulator's, so this is only rounding and packing.
template <typename T, int N>
__device__ __forceinline__ void a_fragments(const float (&acc)[N / 2], uint32_t (&a)[N / 16][4]) {
#pragma unroll
  for (int j = 0; j < N / 16; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) a[j][e] = mma::pack<T>(acc[8 * j + 2 * e], acc[8 * j + 2 * e + 1]);
}

}  // namespace fusedlm::hopper
#endif  // FUSEDLM_SM90_DEVICE

// CUDA's execution model on the CPU: fusedlm's CUDA C++ kernels (the sm_90a ones too: see the
// Hopper section below) run on host memory, so that their logic is checked against the
// references on a machine with no GPU (FUSEDLM_CUDA=EMU builds the core this way;
// tests/test_cuda_emulated.py). The build force-includes this header into every .cu file,
// compiled as C++.
//
// Each CUDA thread is a fiber with its own stack. A block's fibers run one at a time, each from
// one barrier (__syncthreads, __syncwarp, a warp shuffle, ldmatrix, mma.sync, a named barrier,
// an mbarrier's wait or plain arrival) to its next, in thread order or in reverse
// (FUSEDLM_EMU_ORDER=reverse). A thread that reads what another thread wrote without a
// barrier between them reads it too early in one of the two orders, so the tests run both:
// a missing barrier shows up as a wrong result, and barriers that not every thread reaches as
// an error naming the lines they wait at. A cp.async copy lands at its thread's wait for its
// group, so a tile read before the wait is stale too; with FUSEDLM_EMU_COPIES=at-issue it lands
// at once instead, so a prefetch into a buffer another warp still reads (no barrier between)
// overwrites what that warp reads. ldmatrix and mma.sync follow the PTX
// fragment layouts lane by lane (csrc/common/warp_mma.cuh); ldmatrix reads each row when the
// lane that addresses it arrives, so a row written by another lane without a __syncwarp is stale. Shared memory starts each block filled with
// NaNs, dynamic and static __shared__ arrays alike; a launch that asks for more
// than its kernel's dynamic shared memory limit fails as on a GPU. selftest.cu holds the
// emulator to these. Built with FUSEDLM_EMU_SANITIZE=address, accesses outside a tensor's memory
// are reported too. What it cannot show: speed, registers, memory ordering finer than its
// barriers, a misreading of PTX's layouts that a kernel shares with this emulator.
#pragma once
#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "include/cuda_runtime_api.h"

namespace fusedlm::emu {

struct ThreadState {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};

// The running thread's indices and the launch's dimensions.
const ThreadState& current();
// The running thread's lane within its warp.
int lane();
// The block's dynamic shared memory.
unsigned char* dynamic_smem();
// Barriers: every (live) thread of the block, or of the warp.
void sync_block(int line);
void sync_warp(int line);
// A warp collective: every lane puts `bytes` (at most kSlotBytes) from `mine`; returns the
// warp's slots, lane l's at l * kSlotBytes, readable until this lane's next collective. With
// `full_warp`, an error unless all 32 lanes are live (ldmatrix and mma.sync need them all).
constexpr size_t kSlotBytes = 64;
const unsigned char* collective(const void* mine, size_t bytes, bool full_warp, int line);
// A warp exchange: every lane puts `bits`, then reads lane `src`'s (its own where src is out of
// the warp).
uint64_t exchange(uint64_t bits, int src, int line);
// cp.async: `bytes` (16 or 0: zero-fill) from src to dst, 16 bytes written, done when the
// thread waits for its commit group and not before. wait_group(n): every group but the n
// most recently committed; wait_all: every copy.
void cp_async(void* dst, const void* src, int bytes);
void cp_async_commit();
void cp_async_wait_group(int pending);
void cp_async_wait_all();

// Hopper (sm_90a; csrc/common/hopper.cuh): shared memory as a window of addresses (dynamic
// shared memory starts at kSharedBase, not at a 1024-byte boundary, as after static shared
// memory on a GPU); mbarriers (phases, arrival counts, transaction bytes; a wait blocks the
// thread); TMA loads of a tensor map's box, landing at the first wait on their barrier (or when
// every thread waits) or, with FUSEDLM_EMU_COPIES=at-issue, at once; wgmma products, run at the
// thread's wait for their commit group.
constexpr uint32_t kSharedBase = 128;
uint32_t shared_address(const void* p);
void mbar_init(uint32_t bar, uint32_t count, int line);
void mbar_arrive(uint32_t bar, uint32_t expect_bytes, int line);  // expect_bytes, then one arrival
void mbar_wait(uint32_t bar, uint32_t parity, int line);
void tma_load(uint32_t dst, const void* map, const int* coords, int rank, uint32_t bar, int line);
// d[n / 2] (this thread's accumulators) = A B (+ d): A from the descriptor `a` (K-major) or, with
// a_regs, this warp's A fragments; B from the descriptor `b`, MN-major with trans_b.
void wgmma(float* d, int n, uint64_t a, const uint32_t* a_regs, uint64_t b, bool scale_d, bool trans_b, bool bf16,
           int line);
void wgmma_commit();
void wgmma_wait(int pending, int line);
// bar.sync id, threads: waits until `threads` threads have arrived at barrier `id`; bar.arrive:
// arrives without waiting.
void named_barrier(int id, int threads, int line);
void named_barrier_arrive(int id, int threads, int line);
// The emulated device's compute capability (FUSEDLM_EMU_ARCH: 80, the default, or 90).
int arch();

// Runs `body` as the kernel of every thread of the grid; throws std::runtime_error for a
// deadlock, sets the launch error (cudaGetLastError) for a bad configuration.
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  // A launch copies its arguments once; every thread then reads the same values.
  const std::tuple<std::decay_t<Params>...> packed(std::forward<Args>(args)...);
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { std::apply(kernel, packed); });
}

}  // namespace fusedlm::emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
// A block's shared variables: one per kernel instantiation, shared by its threads (the
// emulator runs one block at a time), all in one linker section, which the emulator fills with
// NaNs before each block (emu.cpp: poison_static_shared): a read before any write shows.
#define __shared__ __attribute__((section("fusedlm_emu_shared"))) static

#define threadIdx (::fusedlm::emu::current().thread_idx)
#define blockIdx (::fusedlm::emu::current().block_idx)
#define blockDim (::fusedlm::emu::current().block_dim)
#define gridDim (::fusedlm::emu::current().grid_dim)

inline void __syncthreads(int line = __builtin_LINE()) { ::fusedlm::emu::sync_block(line); }
inline void __syncwarp(unsigned = 0xffffffffu, int line = __builtin_LINE()) { ::fusedlm::emu::sync_warp(line); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32, int line = __builtin_LINE()) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move 8 bytes at most");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::fusedlm::emu::exchange(bits, ::fusedlm::emu::lane() ^ lane_mask, line);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

[[noreturn]] inline void __trap(int line = __builtin_LINE()) {
  throw std::runtime_error("fusedlm emulator: __trap at line " + std::to_string(line));
}

inline float __expf(float x) { return expf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }

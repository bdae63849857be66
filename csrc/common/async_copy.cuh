// 16-byte asynchronous copies from global to shared memory (cp.async, sm_80 and later): issue
// with cp_async_16, then cp_async_commit, and cp_async_wait_all (or cp_async_wait_group, to
// leave later groups in flight) before a __syncthreads lets anyone read the tile. The CPU emulator's build (csrc/emu) completes a thread's copies at its
// wait and not before, so a tile read before the wait shows the NaNs shared memory starts with.
#pragma once
#include <cstdint>

// This compilation has cp.async: device code for sm_80 and later, or the emulator.
#if defined(FUSEDLM_EMULATED) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define FUSEDLM_CP_ASYNC 1
#endif

namespace fusedlm {

#ifdef FUSEDLM_CP_ASYNC
// dst (shared) = 16 bytes at src, or 16 zero bytes without `full` (src is not read then, but
// must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool full) {
#ifdef FUSEDLM_EMULATED
  emu::cp_async(dst, src, full ? 16 : 0);
#else
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(full ? 16 : 0));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef FUSEDLM_EMULATED
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits for this thread's committed copies but the kPending most recent groups (a prefetch
// stays in flight).
template <int kPending>
__device__ __forceinline__ void cp_async_wait_group() {
#ifdef FUSEDLM_EMULATED
  emu::cp_async_wait_group(kPending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// Waits for this thread's copies (a __syncthreads must follow before others read them).
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef FUSEDLM_EMULATED
  emu::cp_async_wait_all();
#else
  asm volatile("cp.async.wait_all;\n" ::);
#endif
}
#endif

}  // namespace fusedlm

// The one launch site of fusedlm's kernels, and their dynamic shared memory. A CUDA build
// launches on the stream; the CPU emulator's build (FUSEDLM_CUDA=EMU, csrc/emu/emu.h) runs the
// same kernel on the CPU instead, which is why no kernel is launched anywhere else.
#pragma once
#include <cstddef>
#include <utility>

#include "cuda_runtime.h"

namespace fusedlm {

// kernel<<<grid, block, smem, stream>>>(args...), then the launch's error named by `what`.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   const char* what, Args&&... args) {
#ifdef FUSEDLM_EMULATED
  (void)stream;
  emu::launch(kernel, grid, block, smem, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
#endif
  cuda_check(cudaGetLastError(), what);
}

// The block's dynamic shared memory, 128-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef FUSEDLM_EMULATED
  return emu::dynamic_smem();
#else
  extern __shared__ __align__(128) unsigned char smem[];
  return smem;
#endif
}

}  // namespace fusedlm

// Triton's counter-based RNG, bit for bit, for host and device: tl.rand(seed, offset) with a
// 32-bit offset is Philox-4x32 (10 rounds) on counter (offset, 0, 0, 0) and key (seed's low and
// high words), whose first word is mapped to [0, 1) as Triton maps it. The CUDA C++ attention
// draws its dropout mask with this, so it drops exactly what the Triton kernels drop.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDLM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDLM_HOST_DEVICE inline
#endif

namespace fusedlm {

FUSEDLM_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

FUSEDLM_HOST_DEVICE float philox_uniform(uint64_t seed, uint32_t offset) {
  uint32_t c0 = offset, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t c0_ = c0, c2_ = c2;
    c0 = mulhi32(0xCD9E8D57u, c2_) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, c0_) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c2_;
    c3 = 0xD2511F53u * c0_;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = static_cast<int32_t>(c0);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

}  // namespace fusedlm

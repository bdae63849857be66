// bfloat16 storage for the CPU emulator (see cuda_fp16.h): bits and the two conversions,
// rounding to nearest even as the GPU's do.
#pragma once
#include <cstdint>

#include "emu_bits.h"

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) { return fusedlm::emu::float_of(static_cast<uint32_t>(h.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = fusedlm::emu::bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((x >> 16) | 0x40u)};  // quiet nan
  return {static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}

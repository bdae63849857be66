// fp32 <-> its bits, for the emulator's fp16 and bf16 conversions.
#pragma once
#include <cstdint>
#include <cstring>

namespace fusedlm::emu {
inline uint32_t bits_of(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  return x;
}
inline float float_of(uint32_t x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
}  // namespace fusedlm::emu

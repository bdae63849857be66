// float16 storage for the CPU emulator: the kernels only convert to and from fp32 (they compute
// in fp32), so the type is its bits and the two conversions, rounding to nearest even as the
// GPU's do.
#pragma once
#include <cstdint>

#include "emu_bits.h"

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu, mant = h.bits & 0x3ffu;
  uint32_t out;
  if (exp == 0x1f) {
    out = sign | 0x7f800000u | (mant << 13);  // inf, nan
  } else if (exp != 0) {
    out = sign | ((exp + 112) << 23) | (mant << 13);  // rebias 15 -> 127
  } else if (mant == 0) {
    out = sign;
  } else {  // subnormal: mant * 2^-24, exact in fp32
    out = sign | fusedlm::emu::bits_of(static_cast<float>(mant) * 5.9604644775390625e-08f);
  }
  return fusedlm::emu::float_of(out);
}

inline __half __float2half_rn(float f) {
  const uint32_t x = fusedlm::emu::bits_of(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u)  // inf stays inf, nan stays a (quiet) nan
    return {static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u))};
  if (ax >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds past 65504
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half (or zero), mant * 2^-24
    const float scaled = fusedlm::emu::float_of(ax) * 16777216.0f;  // exact: a power of two
    // Round half to even on the integer multiple of 2^-24.
    const float fl = static_cast<float>(static_cast<uint32_t>(scaled));
    const float rem = scaled - fl;
    uint32_t m = static_cast<uint32_t>(fl);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return {static_cast<uint16_t>(sign | m)};  // m == 0x400 is the smallest normal: right bits
  }
  // Normal: drop 13 mantissa bits, rounding to nearest even; a carry into the exponent is right.
  const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);
  return {static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
}

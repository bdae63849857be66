// Warp-level tensor-core products on registers (sm_80 and later): mma.sync m16n8k16 with fp16 or
// bf16 operands and fp32 accumulation, and ldmatrix to fill its operands from shared memory.
// Unlike WMMA, whose fragment layout is unspecified, these layouts are PTX's documented ones, so
// a kernel can turn an accumulator into the next product's A operand in registers (the
// attention kernels' P = softmax(S) feeding P V) and address single elements of it (masks).
//
// Lane l is in quad g = l / 4 at position t = l % 4. A 16x16 A operand is 4 registers of two
// elements each: a0 = (g, 2t..2t+1), a1 = (g + 8, 2t..), a2 = (g, 2t + 8..), a3 = (g + 8, 2t + 8..).
// A 16x8 B operand (k x n) is 2: b0 = (2t..2t+1, g), b1 = (2t + 8.., g). A 16x8 fp32 accumulator
// is 4 floats: c0, c1 = (g, 2t), (g, 2t + 1); c2, c3 = (g + 8, 2t), (g + 8, 2t + 1).
// The CPU emulator's build (csrc/emu) computes the same layouts lane by lane.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_math.cuh"

namespace fusedlm::mma {

// Two elements of the storage dtype in one register: lo in the low 16 bits.
template <typename T>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
#ifdef FUSEDLM_EMULATED
  const T l = math::from_float<T>(lo), h = math::from_float<T>(hi);
  uint16_t bl, bh;
  std::memcpy(&bl, &l, 2);
  std::memcpy(&bh, &h, 2);
  return static_cast<uint32_t>(bl) | static_cast<uint32_t>(bh) << 16;
#else
  if constexpr (std::is_same<T, __half>::value) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
#endif
}

#ifdef FUSEDLM_EMULATED
namespace emulated {
// The element of register `r` in its low (0) or high (1) half, as fp32.
template <typename T>
inline float half_of(uint32_t r, int hi) {
  const uint16_t bits = static_cast<uint16_t>(hi ? r >> 16 : r & 0xffffu);
  T v;
  std::memcpy(&v, &bits, 2);
  return math::to_float(v);
}

inline uint32_t halves(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16; }

// ldmatrix .x4: lanes 8i..8i+7 address the rows of matrix i; each lane's 16-byte row is read
// when the lane arrives.
template <bool kTrans>
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, int line) {
  uint16_t mine[8];
  std::memcpy(mine, row, 16);
  const unsigned char* slots = emu::collective(mine, 16, true, line);
  auto at = [&](int l, int c) {  // element c of lane l's row
    uint16_t v;
    std::memcpy(&v, slots + l * emu::kSlotBytes + 2 * c, 2);
    return v;
  };
  const int g = emu::lane() / 4, t = emu::lane() % 4;
  for (int i = 0; i < 4; ++i)
    r[i] = kTrans ? halves(at(8 * i + 2 * t, g), at(8 * i + 2 * t + 1, g)) : halves(at(8 * i + g, 2 * t), at(8 * i + g, 2 * t + 1));
}

// Lane (g, t) computes its four outputs from rows g and g + 8 of A (lanes 4g..4g+3 hold them)
// and columns 2t and 2t + 1 of B (lanes 8t..8t+7).
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], int line) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const unsigned char* slots = emu::collective(mine, sizeof mine, true, line);
  auto reg = [&](int l, int i) {
    uint32_t v;
    std::memcpy(&v, slots + l * emu::kSlotBytes + 4 * i, 4);
    return v;
  };
  const int g = emu::lane() / 4, t = emu::lane() % 4;
  float A[2][16], B[16][2];
  for (int q = 0; q < 4; ++q)
    for (int h = 0; h < 2; ++h) {
      A[0][2 * q + h] = half_of<T>(reg(4 * g + q, 0), h);
      A[1][2 * q + h] = half_of<T>(reg(4 * g + q, 1), h);
      A[0][2 * q + 8 + h] = half_of<T>(reg(4 * g + q, 2), h);
      A[1][2 * q + 8 + h] = half_of<T>(reg(4 * g + q, 3), h);
      for (int n = 0; n < 2; ++n) {
        B[2 * q + h][n] = half_of<T>(reg(4 * (2 * t + n) + q, 4), h);
        B[2 * q + 8 + h][n] = half_of<T>(reg(4 * (2 * t + n) + q, 5), h);
      }
    }
  for (int e = 0; e < 4; ++e) {
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A[e / 2][k] * B[k][e % 2];  // each product exact in fp32
    d[e] = acc;
  }
}
}  // namespace emulated
#endif

// r[i] = matrix i (8x8, 16-bit elements) of the four whose rows lanes 8i..8i+7 address (`row`:
// this lane's row, 16 bytes of shared memory, 16-byte aligned); kTrans transposes each matrix.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row
#ifdef FUSEDLM_EMULATED
                                            , int line = __builtin_LINE()
#endif
) {
#ifdef FUSEDLM_EMULATED
  emulated::ldmatrix_x4<kTrans>(r, row, line);
#else
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
#endif
}

// d += A (16x16) B (16x8), the storage dtype T in, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]
#ifdef FUSEDLM_EMULATED
                                          , int line = __builtin_LINE()
#endif
) {
#ifdef FUSEDLM_EMULATED
  emulated::mma_16816<T>(d, a, b, line);
#else
  if constexpr (std::is_same<T, __half>::value)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

}  // namespace fusedlm::mma

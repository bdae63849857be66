// Triton's counter-based RNG, bit for bit, for host and device, and the dropout keep-mask that
// fusedlm's Triton and CUDA C++ kernels all draw from it.
//
// tl.randint4x(seed, counter) is Philox-4x32 (10 rounds) on counter (its low word, its high
// word, 0, 0) and key (seed's low and high words): four 32-bit words a draw. A 32-bit counter
// and the same value as a 64-bit one draw alike (high word 0).
//
// Dropout: element `col` of row `row` in rows of `cols` elements takes word col % 4 of the draw
// at counter row * ceil(cols / 4) + col / 4, and is kept when that word is at least
// dropout_least(p) = p * 2^32 (dropped with probability p to within 2^-32). Four elements share
// a draw: one Philox call an element made a dropout kernel issue-bound on the draws (60
// instructions each, 40 of them IMAD). The attention kernels draw per (batch, head) stream at
// seed + stream, with rows the queries and cols the keys, the counter in 32 bits (as Triton's
// int32 index arithmetic wraps); layer norm draws at the seed, rows and columns of x.
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

// Philox-4x32 rounds on (c0, c1, c2, c3) with key (k0, k1), the key raised after each.
FUSEDLM_HOST_DEVICE void philox_rounds(int rounds, uint32_t& c0, uint32_t& c1, uint32_t& c2,
                                       uint32_t& c3, uint32_t& k0, uint32_t& k1) {
  for (int round = 0; round < rounds; ++round) {
    const uint32_t c0_ = c0, c2_ = c2;
    c0 = mulhi32(0xCD9E8D57u, c2_) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, c0_) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c2_;
    c3 = 0xD2511F53u * c0_;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// The four words of Philox-4x32-10 at `counter` (tl.randint4x).
FUSEDLM_HOST_DEVICE void philox4x32(uint64_t seed, uint64_t counter, uint32_t (&out)[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0,
           c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  philox_rounds(10, c0, c1, c2, c3, k0, k1);
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Word k (0-3) of that draw alone: nine rounds, then only the tenth's word k. Kernels that
// use one word of a draw keep fewer values live this way than by selecting from all four (a
// register array indexed at run time also goes to local memory).
FUSEDLM_HOST_DEVICE uint32_t philox4x32_word(uint64_t seed, uint64_t counter, uint32_t k) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0,
           c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  philox_rounds(9, c0, c1, c2, c3, k0, k1);
  switch (k) {
    case 0: return mulhi32(0xCD9E8D57u, c2) ^ c1 ^ k0;
    case 1: return 0xCD9E8D57u * c2;
    case 2: return mulhi32(0xD2511F53u, c0) ^ c3 ^ k1;
    default: return 0xD2511F53u * c0;
  }
}

// The smallest word that keeps an element: p * 2^32, p in [0, 1) as fp32 (exact: a power-of-two
// scale; the conversion truncates, as Triton's fp32-to-uint32 cast does).
FUSEDLM_HOST_DEVICE uint32_t dropout_least(float p_drop) {
  return static_cast<uint32_t>(p_drop * 4294967296.0f);
}

// The counter of the draw holding element `col` of row `row` (rows of `cols` elements).
FUSEDLM_HOST_DEVICE uint64_t dropout_counter(uint64_t row, uint64_t cols, uint64_t col) {
  return row * ((cols + 3) / 4) + col / 4;
}

// Is element `col` of the group at `counter` kept? One draw for one element: callers holding
// several elements of a group draw once with philox4x32 and compare each word themselves.
FUSEDLM_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t counter, uint32_t col,
                                      uint32_t least) {
  return philox4x32_word(seed, counter, col % 4) >= least;
}

}  // namespace fusedlm

// nvcuda::wmma's 16x16x16 tiles for the CPU emulator (csrc/emu/emu.h). As on a GPU, a fragment
// is spread over the warp's 32 lanes: lane L holds row L / 2 and columns [8 (L % 2), + 8) of
// its accumulator, the matching row of A and columns of B. (The GPU's mapping is unspecified and
// differs; kernels never rely on it.) So each lane loads, multiplies and stores only its part:
// a lane reading what another lane stored before a __syncwarp sees stale data here, as it may
// on a GPU. Products are exact in fp32 and accumulate in fp32.
#pragma once
#include <type_traits>

#include "../emu.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
inline int row() { return fusedlm::emu::lane() / 2; }
inline int col0() { return fusedlm::emu::lane() % 2 * 8; }
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has the 16x16x16 shape only");
  // A: the lane's row (16); B: 16 rows of the lane's 8 columns; C: the lane's 8 entries.
  static constexpr int num_elements =
      std::is_same<Use, matrix_a>::value ? 16 : std::is_same<Use, matrix_b>::value ? 128 : 8;
  T x[num_elements];
};

template <typename Use, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const V& v) {
  for (auto& e : f.x) e = static_cast<T>(v);
}

template <typename T, typename Layout>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  const int r = detail::row();
  for (int k = 0; k < 16; ++k)
    f.x[k] = std::is_same<Layout, row_major>::value ? p[r * ld + k] : p[k * ld + r];
}

template <typename T, typename Layout>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  const int c0 = detail::col0();
  for (int k = 0; k < 16; ++k)
    for (int j = 0; j < 8; ++j)
      f.x[k * 8 + j] = std::is_same<Layout, row_major>::value ? p[k * ld + c0 + j] : p[(c0 + j) * ld + k];
}

template <typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ld, layout_t l) {
  const int r = detail::row(), c0 = detail::col0();
  for (int j = 0; j < 8; ++j) f.x[j] = l == mem_row_major ? p[r * ld + c0 + j] : p[(c0 + j) * ld + r];
}

template <typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ld, layout_t l) {
  const int r = detail::row(), c0 = detail::col0();
  for (int j = 0; j < 8; ++j) (l == mem_row_major ? p[r * ld + c0 + j] : p[(c0 + j) * ld + r]) = f.x[j];
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[8];
  for (int j = 0; j < 8; ++j) {
    float acc = c.x[j];
    for (int k = 0; k < 16; ++k) acc += detail::to_f(a.x[k]) * detail::to_f(b.x[k * 8 + j]);
    out[j] = acc;
  }
  for (int j = 0; j < 8; ++j) d.x[j] = out[j];
}

}  // namespace nvcuda::wmma

// Kernels that are wrong on purpose, for tests/test_cuda_emulated.py to hold the emulator to
// what emu.h says it finds (built in FUSEDLM_CUDA=EMU cores only; bindings.cpp exposes them).
#include <stdexcept>
#include <vector>

#include "../common/launch.cuh"
#include "../common/warp_mma.cuh"
#include "selftest.h"

namespace fusedlm::emu {
namespace {

// Reverses n values through shared memory; without `barrier` a thread may read its mirror
// before the mirror's thread wrote it.
__global__ void reverse_kernel(const float* in, float* out, int n, bool barrier) {
  float* buf = reinterpret_cast<float*>(dynamic_smem());
  const int i = threadIdx.x;
  if (i < n) buf[i] = in[i];
  if (barrier) __syncthreads();
  if (i < n) out[i] = buf[n - 1 - i];
}

// One warp: D (16 x 16, fp32) = A (16 x 16) B (16 x 16) through shared memory, ldmatrix and
// mma.sync, in the storage dtype T. B is stored k-major (16 k rows of n, read with the
// transposing ldmatrix), else n-major (B^T's rows, read as is). Lane l writes elements l, l + 32,
// ... of each: a row is written by other lanes than the one whose ldmatrix reads it, so without
// `barrier` (a __syncwarp) it is read before they wrote it.
template <typename T>
__global__ void mma_kernel(const float* a, const float* b, float* d, bool trans, bool barrier) {
  constexpr int LD = 24;  // a pitch that keeps each row 16-byte aligned
  T* sA = reinterpret_cast<T*>(dynamic_smem());
  T* sB = sA + 16 * LD;
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  for (int i = lane; i < 256; i += 32) {
    const int r = i / 16, c = i % 16;
    sA[r * LD + c] = math::from_float<T>(a[i]);
    sB[(trans ? r * LD + c : c * LD + r)] = math::from_float<T>(b[i]);  // b[i] = B(r, c)
  }
  if (barrier) __syncwarp();
  uint32_t fa[4], fb[4];
  mma::ldmatrix_x4<false>(fa, sA + (lane % 16) * LD + lane / 16 * 8);
  if (trans)  // matrices: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
    mma::ldmatrix_x4<true>(fb, sB + (lane % 16) * LD + lane / 16 * 8);
  else  // the same four, from B^T's rows n
    mma::ldmatrix_x4<false>(fb, sB + (lane % 8 + lane / 16 * 8) * LD + lane / 8 % 2 * 8);
  float acc[2][4] = {};
  mma::mma_16816<T>(acc[0], fa, {fb[0], fb[1]});
  mma::mma_16816<T>(acc[1], fa, {fb[2], fb[3]});
  for (int j = 0; j < 2; ++j)
    for (int e = 0; e < 4; ++e) d[(g + 8 * (e / 2)) * 16 + 8 * j + 2 * t + e % 2] = acc[j][e];
}

// Writes its static shared array's values to out, then (with `write`) leaves n + block in it:
// with static shared memory filled anew before each block, a block that did not write reads
// NaNs, never what an earlier block (or launch) left.
__global__ void static_shared_kernel(float* out, int n, bool write) {
  __shared__ float cell[8];
  const int i = threadIdx.x;
  __syncthreads();
  if (i < n) out[blockIdx.x * n + i] = cell[i];
  __syncthreads();
  if (write && i < n) cell[i] = static_cast<float>(n + blockIdx.x);
}

// Thread i copies in[i + 1]: the last thread reads one past the end.
__global__ void shift_kernel(const float* in, float* out, int n) {
  const int i = threadIdx.x;
  if (i < n) out[i] = in[i + 1];
}

// Lane 0 leaves before the warp's ldmatrix, which needs all 32 lanes.
__global__ void partial_warp_kernel() {
  if (threadIdx.x == 0) return;
  uint32_t r[4];
  mma::ldmatrix_x4<false>(r, dynamic_smem() + threadIdx.x % 16 * 16);
}

// Half of each warp waits at the block's barrier, the other half at the warp's: neither opens.
__global__ void divergent_kernel() {
  if (threadIdx.x % 32 < 16)
    __syncthreads();
  else
    __syncwarp();
}

}  // namespace

std::vector<float> selftest_static_shared(int blocks, bool write) {
  constexpr int n = 8;
  std::vector<float> out(static_cast<size_t>(blocks) * n);
  launch_kernel(static_shared_kernel, blocks, n, 0, nullptr, "selftest static shared launch", out.data(), n, write);
  return out;
}

std::vector<float> selftest_reverse(const std::vector<float>& in, bool barrier, size_t extra_smem) {
  const int n = static_cast<int>(in.size());
  std::vector<float> out(in.size());
  launch_kernel(reverse_kernel, 1, n, n * sizeof(float) + extra_smem, nullptr, "selftest reverse launch",
                in.data(), out.data(), n, barrier);
  return out;
}

std::vector<float> selftest_mma(const std::vector<float>& a, const std::vector<float>& b, bool bf16, bool trans,
                                bool barrier) {
  if (a.size() != 256 || b.size() != 256) throw std::invalid_argument("selftest_mma takes two 16 x 16 matrices");
  std::vector<float> d(256);
  const size_t smem = 2 * 16 * 24 * 2;
  if (bf16)
    launch_kernel(mma_kernel<__nv_bfloat16>, 1, 32, smem, nullptr, "selftest mma launch", a.data(), b.data(), d.data(),
                  trans, barrier);
  else
    launch_kernel(mma_kernel<__half>, 1, 32, smem, nullptr, "selftest mma launch", a.data(), b.data(), d.data(), trans,
                  barrier);
  return d;
}

std::vector<uint16_t> selftest_to_half(const std::vector<float>& in, bool bf16) {
  std::vector<uint16_t> out;
  for (float f : in) out.push_back(bf16 ? __float2bfloat16_rn(f).bits : __float2half_rn(f).bits);
  return out;
}

std::vector<float> selftest_from_half(const std::vector<uint16_t>& in, bool bf16) {
  std::vector<float> out;
  for (uint16_t b : in) out.push_back(bf16 ? __bfloat162float({b}) : __half2float({b}));
  return out;
}

std::vector<float> selftest_read_past_end(const std::vector<float>& in) {
  std::vector<float> out(in.size());
  const int n = static_cast<int>(in.size());
  launch_kernel(shift_kernel, 1, n, 0, nullptr, "selftest shift launch", in.data(), out.data(), n);
  return out;
}

void selftest_partial_warp() {
  launch_kernel(partial_warp_kernel, 1, 32, 512, nullptr, "selftest partial warp launch");
}

void selftest_divergent() { launch_kernel(divergent_kernel, 1, 64, 0, nullptr, "selftest divergent launch"); }

}  // namespace fusedlm::emu

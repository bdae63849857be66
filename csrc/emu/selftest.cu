// Kernels that are wrong on purpose, for tests/test_cuda_emulated.py to hold the emulator to
// what emu.h says it finds (built in FUSEDLM_CUDA=EMU cores only; bindings.cpp exposes them).
#include <mma.h>

#include <stdexcept>
#include <vector>

#include "../common/launch.cuh"
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

// One warp stores a 16 x 16 tile from its WMMA fragment (each lane its part) and reads it back
// upside down; without `barrier` (a __syncwarp) a lane may read a part not yet stored.
__global__ void fragment_kernel(const float* in, float* out, bool barrier) {
  using namespace nvcuda;
  float* tile = reinterpret_cast<float*>(dynamic_smem());
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(acc, in, 16, wmma::mem_row_major);
  wmma::store_matrix_sync(tile, acc, 16, wmma::mem_row_major);
  if (barrier) __syncwarp();
  for (int i = threadIdx.x; i < 256; i += 32) out[i] = tile[255 - i];
}

// Thread i copies in[i + 1]: the last thread reads one past the end.
__global__ void shift_kernel(const float* in, float* out, int n) {
  const int i = threadIdx.x;
  if (i < n) out[i] = in[i + 1];
}

// Half of each warp waits at the block's barrier, the other half at the warp's: neither opens.
__global__ void divergent_kernel() {
  if (threadIdx.x % 32 < 16)
    __syncthreads();
  else
    __syncwarp();
}

}  // namespace

std::vector<float> selftest_reverse(const std::vector<float>& in, bool barrier, size_t extra_smem) {
  const int n = static_cast<int>(in.size());
  std::vector<float> out(in.size());
  launch_kernel(reverse_kernel, 1, n, n * sizeof(float) + extra_smem, nullptr, "selftest reverse launch",
                in.data(), out.data(), n, barrier);
  return out;
}

std::vector<float> selftest_fragment(const std::vector<float>& in, bool barrier) {
  if (in.size() != 256) throw std::invalid_argument("selftest_fragment takes 256 values");
  std::vector<float> out(256);
  launch_kernel(fragment_kernel, 1, 32, 256 * sizeof(float), nullptr, "selftest fragment launch", in.data(),
                out.data(), barrier);
  return out;
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

void selftest_divergent() { launch_kernel(divergent_kernel, 1, 64, 0, nullptr, "selftest divergent launch"); }

}  // namespace fusedlm::emu

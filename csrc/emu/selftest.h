// The emulator's self-tests (selftest.cu): wrong kernels whose faults it must report.
#pragma once
#include <cstddef>
#include <vector>

namespace fusedlm::emu {

// `in` reversed through shared memory by one block of in.size() threads, with or without the
// __syncthreads between writing and reading; the launch asks for `extra_smem` bytes more.
std::vector<float> selftest_reverse(const std::vector<float>& in, bool barrier, size_t extra_smem = 0);
// A 16 x 16 tile (256 values, row-major) through a WMMA fragment and shared memory, read back
// reversed, with or without the __syncwarp between storing and reading.
std::vector<float> selftest_fragment(const std::vector<float>& in, bool barrier);
// Barriers that never open: throws the emulator's deadlock error.
void selftest_divergent();

}  // namespace fusedlm::emu

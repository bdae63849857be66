// The emulator's self-tests (selftest.cu): wrong kernels whose faults it must report.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace fusedlm::emu {

// `in` reversed through shared memory by one block of in.size() threads, with or without the
// __syncthreads between writing and reading; the launch asks for `extra_smem` bytes more.
std::vector<float> selftest_reverse(const std::vector<float>& in, bool barrier, size_t extra_smem = 0);
// What `blocks` blocks of 8 threads read from a static __shared__ array of 8 floats before
// writing it, each then (with `write`) leaving values in it: NaNs everywhere, since every block
// starts with its static shared memory filled anew.
std::vector<float> selftest_static_shared(int blocks, bool write);
// A B of two 16 x 16 matrices (row-major) in fp16 or bf16, through shared memory, ldmatrix (B
// transposed by it or not) and mma.sync, with or without the __syncwarp between the lanes'
// stores and the ldmatrix reading them.
std::vector<float> selftest_mma(const std::vector<float>& a, const std::vector<float>& b, bool bf16, bool trans,
                                bool barrier);
// The stand-in fp16 (or bf16) conversions: floats to bits, bits to floats.
std::vector<uint16_t> selftest_to_half(const std::vector<float>& in, bool bf16);
std::vector<float> selftest_from_half(const std::vector<uint16_t>& in, bool bf16);
// A kernel reading one element past `in`'s end: in an address-sanitized build
// (FUSEDLM_EMU_SANITIZE=address) the sanitizer reports it and ends the process.
std::vector<float> selftest_read_past_end(const std::vector<float>& in);
// An ldmatrix with one lane gone: throws the emulator's error for it.
void selftest_partial_warp();
// Barriers that never open: throws the emulator's deadlock error.
void selftest_divergent();

}  // namespace fusedlm::emu

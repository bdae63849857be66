// Device queries and error handling shared by the CUDA launchers. Declared for every build;
// without CUDA they report that the core was built without it.
#pragma once
#include <cstdint>
#include <string>

namespace fusedlm {

// Are the kernels built (for a GPU, or for the CPU emulator: FUSEDLM_EMULATED)?
bool built_with_cuda();
// Number of visible GPUs; 0 (never an exception) when there is no driver or no device.
int cuda_device_count();
// One line: how many GPUs, or why there are none.
std::string cuda_status();
// The error of every launcher in a build without CUDA.
[[noreturn]] void throw_built_without_cuda();

}  // namespace fusedlm

#ifdef FUSEDLM_WITH_CUDA
#include <cuda_runtime_api.h>

#include <stdexcept>

namespace fusedlm {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err));
}

// Makes `device` current for a scope and restores the previous device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cuda_check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) cuda_check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

}  // namespace fusedlm
#endif

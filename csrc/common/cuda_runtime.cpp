#include "cuda_runtime.h"

#include <stdexcept>

namespace fusedlm {

void throw_built_without_cuda() {
  throw std::runtime_error("fusedlm._C was built without CUDA: the 'cuda' backend is unavailable");
}

#if defined(FUSEDLM_EMULATED)
// The kernels are built, for the CPU emulator (csrc/emu): no GPU is used, whatever the machine has.
bool built_with_cuda() { return true; }
int cuda_device_count() { return 0; }
std::string cuda_status() { return "no GPU used: fusedlm._C emulates its CUDA kernels on the CPU (FUSEDLM_CUDA=EMU)"; }
#elif defined(FUSEDLM_WITH_CUDA)
bool built_with_cuda() { return true; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

std::string cuda_status() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    // With no driver installed the runtime says "CUDA driver version is insufficient for CUDA
    // runtime version", which sends a user hunting for a driver upgrade: say what it means.
    if (err == cudaErrorInsufficientDriver) return "no GPU available: no NVIDIA driver found";
    if (err == cudaErrorNoDevice) return "no GPU available: no CUDA GPU found";
    return std::string("no GPU available: ") + cudaGetErrorString(err);
  }
  return n == 0 ? std::string("no GPU available") : std::to_string(n) + " GPU(s) visible";
}
#else
bool built_with_cuda() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_status() { return "fusedlm._C was built without CUDA"; }
#endif

}  // namespace fusedlm

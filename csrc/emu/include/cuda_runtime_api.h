// The part of the CUDA runtime API that fusedlm's launchers use, for the CPU emulator
// (FUSEDLM_CUDA=EMU, csrc/emu/emu.h): "device" memory is host memory, streams are ignored
// (the emulator runs each launch to completion before it returns), and the errors a launch
// can raise come back through cudaGetLastError as on a GPU.
#pragma once

#define CUDART_VERSION 12080

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInsufficientDriver = 35,
  cudaErrorNoDevice = 100,
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

enum cudaDeviceAttr {
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};

// The driver's entry points, as the runtime hands them out: the emulator has one,
// cuTensorMapEncodeTiled (the Hopper kernels' tensor maps).
enum cudaDriverEntryPointQueryResult {
  cudaDriverEntryPointSuccess = 0,
  cudaDriverEntryPointSymbolNotFound = 1,
  cudaDriverEntryPointVersionNotSufficent = 2
};
enum { cudaEnableDefault = 0 };
cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned version, unsigned long long flags,
                                             cudaDriverEntryPointQueryResult* status);

const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetLastError();
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

namespace fusedlm::emu {
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);
}

// Raising a kernel's dynamic shared memory above 48 KB, as on a GPU (up to an A100's 163 KB, or
// an H100's 227 KB on the emulated 9.0 device, FUSEDLM_EMU_ARCH=90).
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return fusedlm::emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
}

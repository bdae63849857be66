// Device helpers shared by fusedlm's CUDA kernels: float conversions for the three storage
// dtypes and 16-byte vector loads/stores that convert to and from fp32 registers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fusedlm::math {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float(float v) { return v; }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float(float v) { return v; }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__device__ __forceinline__ void load(const T* p, float (&out)[kVec]) {
  const Pack<T, kVec> pk = *reinterpret_cast<const Pack<T, kVec>*>(p);
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = to_float(pk.v[j]);
}

template <typename T, int kVec>
__device__ __forceinline__ void store(T* p, const float (&in)[kVec]) {
  Pack<T, kVec> pk;
#pragma unroll
  for (int j = 0; j < kVec; ++j) pk.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Pack<T, kVec>*>(p) = pk;
}

}  // namespace fusedlm::math

// The one dtype switch of the launchers: turns a runtime DType into the storage type T a kernel
// template takes, so that each launcher writes its kernel call once, in a generic lambda that
// gets a value-initialized T:
//
//   with_float_type(x.dtype, "the CUDA layer-norm kernel", [&](auto t) {
//     using T = decltype(t);
//     kernel<T><<<grid, block, 0, stream>>>(...);
//   });
//
// (T is the lambda's own deduced type, not a member typedef: nvcc's generated launch stubs
// spell kernel template arguments as written, and a typedef member of a helper class is not
// visible where they are emitted.)
//
// A dtype outside the set is a DTypeError (-> Python TypeError) naming `what`. Host code only;
// include after <cuda_fp16.h> and <cuda_bf16.h>.
#pragma once
#include <string>

#include "tensor.h"

namespace fusedlm {

// float32, float16 or bfloat16.
template <typename F>
void with_float_type(DType d, const char* what, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    default:
      throw DTypeError(std::string(what) + " takes float32, float16 or bfloat16, got " + dtype_name(d));
  }
}

// float16 or bfloat16 (the tensor-core kernels).
template <typename F>
void with_half_type(DType d, const char* what, F&& f) {
  switch (d) {
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    default: throw DTypeError(std::string(what) + " takes float16 or bfloat16, got " + dtype_name(d));
  }
}

}  // namespace fusedlm

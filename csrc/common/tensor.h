// A framework-free view of a tensor (pointer, dtype, shape, strides, device) and the argument
// checks every op's host code uses. Checks throw ArgError (-> Python ValueError) or DTypeError
// (-> Python TypeError) naming the argument; nothing here aborts or touches device memory.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "dlpack.h"

namespace fusedlm {

struct ArgError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct DTypeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64, kInt64, kInt32, kInt8, kOther };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
    case DType::kInt64: return "int64";
    case DType::kInt32: return "int32";
    case DType::kInt8: return "int8";
    default: return "an unsupported dtype";
  }
}

inline int dtype_size(DType d) {
  switch (d) {
    case DType::kFloat32:
    case DType::kInt32: return 4;
    case DType::kInt8: return 1;
    case DType::kFloat64:
    case DType::kInt64: return 8;
    default: return 2;
  }
}

constexpr int kMaxDims = 8;

struct TensorView {
  const char* name = "";
  void* data = nullptr;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t stride[kMaxDims] = {};
  DType dtype = DType::kOther;
  int device_type = 0;
  int device_id = 0;
};

// Has it no elements? Such a view addresses no memory, so its strides are never checked.
inline bool empty(const TensorView& t) {
  for (int i = 0; i < t.ndim; ++i)
    if (t.shape[i] == 0) return true;
  return false;
}

inline std::string str(const TensorView& t) {
  std::string s = "(";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + (t.ndim == 1 ? ",)" : ")");
}

// Borrow a DLPack tensor as a view; the caller keeps the capsule alive for the call.
TensorView view_of(const dlpack::Tensor& t, const char* name);

// Argument checks. `rows`/`cols` of -1 accept any size.
void check_dtype(const TensorView& t, DType want);
void check_float_dtype(const TensorView& t);  // float32, float16 or bfloat16
void check_matrix(const TensorView& t, int64_t rows, int64_t cols);  // 2-D, unit column stride
void check_vector(const TensorView& t, int64_t n);                   // 1-D, contiguous
void check_same_device(const TensorView& t, const TensorView& ref);  // also: ref is on CUDA (emulated: CPU)

}  // namespace fusedlm

#include "tensor.h"

namespace fusedlm {

TensorView view_of(const dlpack::Tensor& t, const char* name) {
  TensorView v;
  v.name = name;
  if (t.ndim < 0 || t.ndim > kMaxDims)
    throw ArgError(std::string(name) + " must have at most " + std::to_string(kMaxDims) +
                   " dimensions, got " + std::to_string(t.ndim));
  if (t.dtype.lanes != 1) throw DTypeError(std::string(name) + " must not be a vector dtype");
  if (t.ndim > 0 && t.shape == nullptr)
    throw ArgError(std::string(name) + " is a malformed DLPack tensor: " + std::to_string(t.ndim) +
                   " dimensions but no shape");
  v.ndim = t.ndim;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  // Extents and strides a kernel can index without overflow: non-negative, and the farthest
  // element within kMaxSpan elements and bytes of the first (more than any device holds).
  constexpr int64_t kMaxSpan = int64_t{1} << 48;
  int64_t compact = 1, numel = 1, last = 0;  // `last`: offset of the farthest element
  for (int i = t.ndim - 1; i >= 0; --i) {
    const int64_t n = t.shape[i];
    if (n < 0)
      throw ArgError(std::string(name) + " has a negative extent " + std::to_string(n) +
                     " in dimension " + std::to_string(i));
    v.shape[i] = n;
    v.stride[i] = t.strides ? t.strides[i] : compact;
    if (v.stride[i] < 0)
      throw ArgError(std::string(name) + " has a negative stride " + std::to_string(v.stride[i]) +
                     " in dimension " + std::to_string(i));
    if (n == 0) numel = 0;
    int64_t reach;
    if (n > 0 && (__builtin_mul_overflow(n - 1, v.stride[i], &reach) ||
                  __builtin_add_overflow(last, reach, &last) || last > kMaxSpan))
      throw ArgError(std::string(name) + " spans more than 2^48 elements (stride " +
                     std::to_string(v.stride[i]) + " over extent " + std::to_string(n) +
                     " in dimension " + std::to_string(i) + ")");
    if (compact <= kMaxSpan) compact *= n;  // only used while it stays small
  }
  if (t.dtype.code == dlpack::kFloat && t.dtype.bits == 32) v.dtype = DType::kFloat32;
  else if (t.dtype.code == dlpack::kFloat && t.dtype.bits == 16) v.dtype = DType::kFloat16;
  else if (t.dtype.code == dlpack::kBfloat && t.dtype.bits == 16) v.dtype = DType::kBFloat16;
  else if (t.dtype.code == dlpack::kFloat && t.dtype.bits == 64) v.dtype = DType::kFloat64;
  else if (t.dtype.code == dlpack::kInt && t.dtype.bits == 64) v.dtype = DType::kInt64;
  else if (t.dtype.code == dlpack::kInt && t.dtype.bits == 32) v.dtype = DType::kInt32;
  else if (t.dtype.code == dlpack::kInt && t.dtype.bits == 8) v.dtype = DType::kInt8;
  if (numel > 0 && last > 0 && (last + 1) * int64_t{dtype_size(v.dtype)} > kMaxSpan)
    throw ArgError(std::string(name) + " spans more than 2^48 bytes");
  if (numel > 0 && t.data == nullptr)
    throw ArgError(std::string(name) + " has elements but a null data pointer");
  v.device_type = t.device.device_type;
  v.device_id = t.device.device_id;
  return v;
}

void check_dtype(const TensorView& t, DType want) {
  if (t.dtype != want)
    throw DTypeError(std::string(t.name) + " must be " + dtype_name(want) + ", got " +
                     dtype_name(t.dtype));
}

void check_float_dtype(const TensorView& t) {
  if (t.dtype != DType::kFloat32 && t.dtype != DType::kFloat16 && t.dtype != DType::kBFloat16)
    throw DTypeError(std::string(t.name) + " must be float32, float16 or bfloat16, got " +
                     dtype_name(t.dtype));
}

void check_matrix(const TensorView& t, int64_t rows, int64_t cols) {
  if (t.ndim != 2 || (rows >= 0 && t.shape[0] != rows) || (cols >= 0 && t.shape[1] != cols))
    throw ArgError(std::string(t.name) + " must have shape (" +
                   (rows >= 0 ? std::to_string(rows) : std::string("rows")) + ", " +
                   (cols >= 0 ? std::to_string(cols) : std::string("cols")) + "), got " + str(t));
  if (t.shape[1] > 1 && t.stride[1] != 1)
    throw ArgError(std::string(t.name) + " must have unit stride along its last dimension, got " +
                   std::to_string(t.stride[1]));
  if (t.shape[0] > 1 && t.stride[0] < t.shape[1])
    throw ArgError(std::string(t.name) + " rows must not overlap (row stride " +
                   std::to_string(t.stride[0]) + " < " + std::to_string(t.shape[1]) + " columns)");
}

void check_vector(const TensorView& t, int64_t n) {
  if (t.ndim != 1 || t.shape[0] != n)
    throw ArgError(std::string(t.name) + " must have shape (" + std::to_string(n) + ",), got " +
                   str(t));
  if (n > 1 && t.stride[0] != 1)
    throw ArgError(std::string(t.name) + " must be contiguous, got stride " +
                   std::to_string(t.stride[0]));
}

void check_same_device(const TensorView& t, const TensorView& ref) {
#ifdef FUSEDLM_EMULATED
  if (ref.device_type != dlpack::kCPU)
    throw ArgError(std::string(ref.name) + " must be a CPU tensor: this core emulates its CUDA kernels on the "
                   "CPU (DLPack device type " + std::to_string(ref.device_type) + ")");
#else
  if (ref.device_type != dlpack::kCUDA)
    throw ArgError(std::string(ref.name) + " must be a CUDA tensor (DLPack device type " +
                   std::to_string(ref.device_type) + ")");
#endif
  if (t.device_type != ref.device_type || t.device_id != ref.device_id)
    throw ArgError(std::string(t.name) + " must be on the same device as " + ref.name);
}

}  // namespace fusedlm

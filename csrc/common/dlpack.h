// The DLPack ABI (the legacy, unversioned `DLManagedTensor` that torch.utils.dlpack.to_dlpack
// hands out in a capsule named "dltensor"), declared from the DLPack specification so that the
// core needs neither torch's headers nor a vendored copy of dlpack.h.
#pragma once
#include <cstdint>

namespace fusedlm::dlpack {

enum DeviceType : int32_t { kCPU = 1, kCUDA = 2, kCUDAHost = 3, kCUDAManaged = 13 };
enum TypeCode : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4 };

struct Device {
  int32_t device_type;
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; may be null for a compact row-major tensor
  uint64_t byte_offset;
};

struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

constexpr const char* kCapsuleName = "dltensor";

}  // namespace fusedlm::dlpack

// CUDA kernels for layer norm / RMSNorm (+ residual), forward and backward.
//
// One thread block owns a row (forward) or a contiguous block of rows (backward). A thread
// holds kIters vectors of kVec elements of the row in registers, so each row is read once and
// written once; statistics are fp32 with a two-pass (mean, then centered sum of squares)
// variance. The backward keeps per-column partial sums of dweight/dbias in registers across
// its rows, writes one partial row per block, and a column-sum kernel reduces them in a fixed
// order, so parameter gradients are deterministic for a given grid.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "../common/cuda_math.cuh"
#include "../common/cuda_runtime.h"
#include "../common/dtype_dispatch.h"
#include "../common/launch.cuh"
#include "../common/philox.h"
#include "layer_norm.h"

namespace fusedlm::layer_norm {
namespace {

using math::from_float;
using math::load;
using math::store;
using math::to_float;

constexpr int kMaxThreads = 512;
constexpr int kMaxValues = 16;  // of a row, per thread
static_assert(kMaxColumns == kMaxValues * kMaxThreads, "the widest row fits one block");
// Kernels are declared __launch_bounds__(kMaxThreads, 1): 128 registers a thread. Without the
// 1, ptxas aimed at two 512-thread blocks an SM (64 registers) and spilled (nvcc -Xptxas -v).

// Parameters are in the input's dtype or float32: a branch, not a template parameter. Typed at
// compile time, the loads were hoisted across the unrolled iterations and the 16-values
// backward spilled 8-76 bytes at sm_80 (nvcc -Xptxas -v); the branch is the same for the whole
// grid.
template <typename T>
__device__ __forceinline__ float load_param(const void* p, int64_t i, bool fp32) {
  return fp32 ? static_cast<const float*>(p)[i] : to_float(static_cast<const T*>(p)[i]);
}

struct Sum {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Max {  // of values >= 0 (0 is the identity the idle lanes contribute)
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduces K values over the block with `op`; every thread gets the results. Fixed order:
// deterministic.
template <int K, typename Op = Sum>
__device__ __forceinline__ void block_reduce(float (&v)[K], Op op = Op()) {
  __shared__ float partial[32][K];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
#pragma unroll
  for (int k = 0; k < K; ++k)
    for (int o = 16; o > 0; o >>= 1) v[k] = op(v[k], __shfl_xor_sync(0xffffffffu, v[k], o));
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) partial[warp][k] = v[k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = lane < warps ? partial[lane][k] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v[k] = op(v[k], __shfl_xor_sync(0xffffffffu, v[k], o));
  }
  __syncthreads();  // `partial` is reused by the next call
}

template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K]) { block_reduce<K>(v); }

// Sum over the block's slice of the row of f(v); every thread gets it.
template <int kVec, int kIters, typename F>
__device__ __forceinline__ float row_sum(const float (&v)[kIters][kVec], int64_t n, F f) {
  float acc[1] = {0.0f};
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t c = (static_cast<int64_t>(it) * blockDim.x + threadIdx.x) * kVec;
    if (c < n)
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[0] += f(v[it][j]);
  }
  block_sum<1>(acc);
  return acc[0];
}

// Dropout as the kernels take it: the seed by value or (under torch.compile) by pointer.
struct DropParams {
  bool on;         // p > 0 (p as double: an fp32 p of 0 still takes the dropout path)
  float p, scale;  // scale = 1 / (1 - p)
  uint64_t seed;
  const int64_t* seed_ptr;
};

// The seed: by value, or the low 32 bits of *seed_ptr as a signed int (as the Triton kernels
// read it).
__device__ __forceinline__ uint64_t seed_of(const DropParams& d) {
  return d.seed_ptr ? static_cast<uint64_t>(static_cast<int64_t>(static_cast<int32_t>(*d.seed_ptr)))
                    : d.seed;
}

// v (kVec values of row `row` from column c) dropped out in place: a kept value scaled by
// 1 / (1 - p) and rounded to T (`kRound`: the forward's x, as the unfused dropout's output is)
// or not (the backward's gradient, rounded when stored). Rows of 16-byte vectors (kVec a
// multiple of 4, c then too) take a Philox draw per four columns, here. Unaligned rows (kVec 1)
// take one an element, drawn beforehand in a rolled loop (`keep_bits`): inlined into the
// unrolled iterations, 16 interleaved draws made the float backward spill 60-80 bytes at sm_80
// (nvcc -Xptxas -v); bit `it` of `bits` is then iteration it's keep.
template <typename T, int kVec, bool kRound>
__device__ __forceinline__ void drop(const DropParams& d, uint64_t seed, int64_t row, int64_t n,
                                     int64_t c, uint32_t bits, int it, float (&v)[kVec]) {
  auto apply = [&](float x, bool keep) {
    const float kept = x * d.scale;
    return keep ? (kRound ? to_float(from_float<T>(kept)) : kept) : 0.0f;
  };
  if constexpr (kVec % 4 == 0) {
    const uint32_t least = dropout_least(d.p);
#pragma unroll
    for (int g = 0; g < kVec / 4; ++g) {
      uint32_t w[4];
      philox4x32(seed, dropout_counter(row, n, c + 4 * g), w);
#pragma unroll
      for (int k = 0; k < 4; ++k) v[4 * g + k] = apply(v[4 * g + k], w[k] >= least);
    }
  } else {
    static_assert(kVec == 1, "vectors are 16 bytes (a multiple of 4 elements) or 1 element");
    v[0] = apply(v[0], (bits >> it) & 1u);
  }
}

// Does this instantiation have dropout? Not float32 rows of single values at 16 a thread (4097
// to 8192 columns, not 16-byte aligned): its backward held 128 registers before dropout and
// spilled 8-16 bytes with it at sm_80 (nvcc -Xptxas -v), so the host refuses that case
// (layer_norm.cpp: check_dropout_fits) and the code is left out.
template <typename T, int kVec, int kIters>
constexpr bool drops() {
  return !(sizeof(T) == 4 && kVec == 1 && kIters * kVec == kMaxValues);
}

// The keeps of a thread's kIters single columns of row `row` (kVec 1), one bit an iteration.
template <int kVec, int kIters>
__device__ __forceinline__ uint32_t keep_bits(const DropParams& d, uint64_t seed, int64_t row,
                                              int64_t n) {
  static_assert(kIters <= 32, "one bit an iteration");
  uint32_t bits = 0;
  if constexpr (kVec == 1) {
    const uint32_t least = dropout_least(d.p);
#pragma unroll 1
    for (int it = 0; it < kIters; ++it) {
      const int64_t c = static_cast<int64_t>(it) * blockDim.x + threadIdx.x;
      if (c < n && dropout_keep(seed, dropout_counter(row, n, c), static_cast<uint32_t>(c), least))
        bits |= 1u << it;
    }
  }
  return bits;
}

struct FwdParams {
  const void *x, *res, *w, *b;
  void *y, *z;
  float *mean, *rstd;
  int64_t n, sx, sres, sy, sz;
  float eps;
  bool params_fp32;
  DropParams drop;
};

// kRms (RMSNorm: no mean, one block reduction fewer a row) is a template parameter, as Triton's
// IS_RMS constexpr.
template <typename T, int kVec, int kIters, bool kRms>
__global__ void __launch_bounds__(kMaxThreads, 1) norm_fwd_kernel(FwdParams p) {
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.sx;
  const T* res = p.res ? static_cast<const T*>(p.res) + row * p.sres : nullptr;
  float v[kIters][kVec];
  float sum[1] = {0.0f};
  const bool dropout = drops<T, kVec, kIters>() && p.drop.on;
  const uint64_t seed = dropout ? seed_of(p.drop) : 0;
  const uint32_t bits = dropout ? keep_bits<kVec, kIters>(p.drop, seed, row, p.n) : 0u;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t c = (static_cast<int64_t>(it) * blockDim.x + threadIdx.x) * kVec;
    if (c < p.n) {  // kVec > 1 only when n % kVec == 0: the whole vector is in range
      load<T, kVec>(x + c, v[it]);
      if (dropout) drop<T, kVec, true>(p.drop, seed, row, p.n, c, bits, it, v[it]);
      if (res) {
        float r[kVec];
        load<T, kVec>(res + c, r);
        // Round the sum to T, as the unfused `x + residual` would, before normalizing it.
#pragma unroll
        for (int j = 0; j < kVec; ++j) v[it][j] = to_float(from_float<T>(v[it][j] + r[j]));
      }
      if (p.z) store<T, kVec>(static_cast<T*>(p.z) + row * p.sz + c, v[it]);
#pragma unroll
      for (int j = 0; j < kVec; ++j) sum[0] += v[it][j];
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[it][j] = 0.0f;
    }
  }
  const float inv_n = 1.0f / p.n;
  float mean = 0.0f;
  if constexpr (!kRms) {
    block_sum<1>(sum);
    mean = sum[0] / p.n;
    // The sum overflowed (|x| near float32's max): divide first. The branch is the same for
    // the whole block (every thread holds the same total), so its barriers are safe.
    if (fabsf(mean) > 3.0e38f) mean = row_sum(v, p.n, [inv_n](float a) { return a * inv_n; });
  }
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t c = (static_cast<int64_t>(it) * blockDim.x + threadIdx.x) * kVec;
    if (c < p.n)
#pragma unroll
      for (int j = 0; j < kVec; ++j) v[it][j] -= mean;
  }
  const float var = row_sum(v, p.n, [](float a) { return a * a; }) / p.n;
  float rstd;
  if (var > 3.0e38f) {
    // The squares overflowed (|x - mean| beyond ~1e19): square the row scaled by its largest
    // value instead (block-uniform branch). Such a variance dwarfs eps.
    float big[1] = {0.0f};
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t c = (static_cast<int64_t>(it) * blockDim.x + threadIdx.x) * kVec;
      if (c < p.n)
#pragma unroll
        for (int j = 0; j < kVec; ++j) big[0] = fmaxf(big[0], fabsf(v[it][j]));
    }
    block_reduce<1>(big, Max());
    const float inv = 1.0f / big[0];
    rstd = inv * rsqrtf(row_sum(v, p.n, [inv](float a) { return (a * inv) * (a * inv); }) / p.n);
  } else {
    rstd = rsqrtf(var + p.eps);
  }
  if (threadIdx.x == 0) {
    p.rstd[row] = rstd;
    if constexpr (!kRms) p.mean[row] = mean;
  }
  T* y = static_cast<T*>(p.y) + row * p.sy;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t c = (static_cast<int64_t>(it) * blockDim.x + threadIdx.x) * kVec;
    if (c >= p.n) continue;
    float out[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      out[j] = v[it][j] * rstd;
      if (p.w) out[j] *= load_param<T>(p.w, c + j, p.params_fp32);
      if (p.b) out[j] += load_param<T>(p.b, c + j, p.params_fp32);
    }
    store<T, kVec>(y + c, out);
  }
}

struct BwdParams {
  const void *dy, *z, *w, *dz_extra;
  const float *mean, *rstd;
  void *dz, *dx;  // dz: the sum's gradient (or null); dx: x's, with dropout only
  float *dw_part, *db_part;
  int64_t rows, n, sdy, sz, sextra, sdz, sdx, rows_per_block;
  bool params_fp32;
  DropParams drop;
};

// A thread's share of one row in the backward: its gradient g, xhat and wdy = w * g, per value
// (0 past the row's end).
template <typename T, int kVec>
__device__ __forceinline__ void bwd_values(const BwdParams& p, const T* dy, const T* z, int64_t c,
                                           float mean, float rstd, const float (&w)[kVec],
                                           float (&g)[kVec], float (&xhat)[kVec],
                                           float (&wdy)[kVec]) {
  float zv[kVec];
  if (c < p.n) {
    load<T, kVec>(dy + c, g);
    load<T, kVec>(z + c, zv);
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    if (c >= p.n) g[j] = zv[j] = 0.0f;
    xhat[j] = c < p.n ? (zv[j] - mean) * rstd : 0.0f;
    wdy[j] = w[j] * g[j];
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void load_weights(const BwdParams& p, int64_t c, float (&w)[kVec]) {
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    w[j] = (p.w && c < p.n) ? load_param<T>(p.w, c + j, p.params_fp32) : 1.0f;
}

template <typename T, int kVec, int kIters, bool kRms>
__global__ void __launch_bounds__(kMaxThreads, 1) norm_bwd_kernel(BwdParams p) {
  // Up to 8 values a thread keeps its row share (xhat, wdy) and the weights in registers
  // between the two passes over the row. Past that, five arrays of 16 floats need more than the
  // 128 registers 512 threads leave each (nvcc -Xptxas -v, sm_90a: spills once the code is
  // shared): the second pass re-reads dy, z and w (the first read left them in cache) and only
  // the dw/db sums stay in registers.
  constexpr bool kKeep = kVec * kIters <= 8;
  constexpr int kHeld = kKeep ? kIters : 1;
  float w[kHeld][kVec], dw[kIters][kVec], db[kIters][kVec];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t c = (static_cast<int64_t>(it) * blockDim.x + threadIdx.x) * kVec;
    if constexpr (kKeep) load_weights<T, kVec>(p, c, w[it]);
#pragma unroll
    for (int j = 0; j < kVec; ++j) dw[it][j] = db[it][j] = 0.0f;
  }
  const int64_t first = blockIdx.x * p.rows_per_block;
  const int64_t last = min(first + p.rows_per_block, p.rows);
  const bool dropout = drops<T, kVec, kIters>() && p.drop.on;
  const uint64_t seed = dropout ? seed_of(p.drop) : 0;
  for (int64_t row = first; row < last; ++row) {
    // Drawn before the row's values are held (kVec 1: the keeps as bits, see drop).
    const uint32_t bits = dropout ? keep_bits<kVec, kIters>(p.drop, seed, row, p.n) : 0u;
    const T* dy = static_cast<const T*>(p.dy) + row * p.sdy;
    const T* z = static_cast<const T*>(p.z) + row * p.sz;
    const float rstd = p.rstd[row], mean = kRms ? 0.0f : p.mean[row];
    float xhat[kHeld][kVec], wdy[kHeld][kVec];
    constexpr int kSums = kRms ? 1 : 2;  // sum(xhat * wdy), and sum(wdy) unless RMSNorm
    float sums[kSums] = {};
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t c = (static_cast<int64_t>(it) * blockDim.x + threadIdx.x) * kVec;
      const int k = kKeep ? it : 0;
      if constexpr (!kKeep) load_weights<T, kVec>(p, c, w[0]);
      float g[kVec];
      bwd_values<T, kVec>(p, dy, z, c, mean, rstd, w[k], g, xhat[k], wdy[k]);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        dw[it][j] += g[j] * xhat[k][j];
        db[it][j] += g[j];
        sums[0] += xhat[k][j] * wdy[k][j];
        if constexpr (!kRms) sums[kSums - 1] += wdy[k][j];
      }
    }
    block_sum<kSums>(sums);
    const float c1 = sums[0] / p.n, c2 = kRms ? 0.0f : sums[kSums - 1] / p.n;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t c = (static_cast<int64_t>(it) * blockDim.x + threadIdx.x) * kVec;
      if (c >= p.n) continue;
      const int k = kKeep ? it : 0;
      if constexpr (!kKeep) {
        float g[kVec];
        load_weights<T, kVec>(p, c, w[0]);
        bwd_values<T, kVec>(p, dy, z, c, mean, rstd, w[0], g, xhat[0], wdy[0]);
      }
      float out[kVec], extra[kVec];
      if (p.dz_extra) load<T, kVec>(static_cast<const T*>(p.dz_extra) + row * p.sextra + c, extra);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        out[j] = (wdy[k][j] - (xhat[k][j] * c1 + c2)) * rstd;
        if (p.dz_extra) out[j] += extra[j];
      }
      if (p.dz) store<T, kVec>(static_cast<T*>(p.dz) + row * p.sdz + c, out);
      if (dropout) {  // x's gradient: the sum's, dropped out as x was
        drop<T, kVec, false>(p.drop, seed, row, p.n, c, bits, it, out);
        store<T, kVec>(static_cast<T*>(p.dx) + row * p.sdx + c, out);
      }
    }
  }
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t c = (static_cast<int64_t>(it) * blockDim.x + threadIdx.x) * kVec;
    if (c >= p.n) continue;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (p.dw_part) p.dw_part[blockIdx.x * p.n + c + j] = dw[it][j];
      if (p.db_part) p.db_part[blockIdx.x * p.n + c + j] = db[it][j];
    }
  }
}

// out[c] = sum over parts of part[., c], in order: coalesced across threads, deterministic.
template <typename T>
__global__ void column_sum_kernel(const float* part, int64_t parts, int64_t n, T* out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= n) return;
  float acc = 0.0f;
  for (int64_t g = 0; g < parts; ++g) acc += part[g * n + c];
  out[c] = from_float<T>(acc);
}

struct Shape {
  int iters, threads;
};

// Smallest kIters in {1, 2, 4, ...} with ceil(vectors / kIters) <= kMaxThreads; kVec * kIters
// is capped at kMaxValues of the row per thread, enough for kMaxColumns at kVec = 1.
Shape pick_shape(int64_t n, int vec) {
  const int64_t vectors = (n + vec - 1) / vec;
  int iters = 1;
  while ((vectors + iters - 1) / iters > kMaxThreads) iters *= 2;
  const int64_t threads = (vectors + iters - 1) / iters;
  return {iters, static_cast<int>(std::max<int64_t>(32, (threads + 31) / 32 * 32))};
}

// Calls f.template run<T, kVec, kIters, kRms>() for the compile-time shape matching
// (vec, iters).
template <typename T, bool kRms, int kVec, typename F>
void by_iters(int iters, const F& f) {
  // One instantiation per power of two up to kMaxValues a thread.
  if constexpr (kVec * 1 <= kMaxValues)
    if (iters == 1) return f.template run<T, kVec, 1, kRms>();
  if constexpr (kVec * 2 <= kMaxValues)
    if (iters == 2) return f.template run<T, kVec, 2, kRms>();
  if constexpr (kVec * 4 <= kMaxValues)
    if (iters == 4) return f.template run<T, kVec, 4, kRms>();
  if constexpr (kVec * 8 <= kMaxValues)
    if (iters == 8) return f.template run<T, kVec, 8, kRms>();
  if constexpr (kVec * 16 <= kMaxValues)
    if (iters == 16) return f.template run<T, kVec, 16, kRms>();
  throw ArgError("hidden size too large for the CUDA layer-norm kernel");
}

template <typename T, bool kRms, typename F>
void by_vec(int vec, int iters, const F& f) {
  constexpr int kWide = 16 / sizeof(T);
  if (vec == kWide) return by_iters<T, kRms, kWide>(iters, f);
  return by_iters<T, kRms, 1>(iters, f);
}

// The input's dtype and RMSNorm or not, as template arguments.
template <typename F>
void by_kind(DType d, bool rms, int vec, int iters, const F& f) {
  with_float_type(d, "the CUDA layer-norm kernel", [&](auto t) {
    using T = decltype(t);
    if (rms) return by_vec<T, true>(vec, iters, f);
    return by_vec<T, false>(vec, iters, f);
  });
}

struct FwdLaunch {
  FwdParams p;
  unsigned blocks;
  int threads;
  cudaStream_t stream;
  template <typename T, int kVec, int kIters, bool kRms>
  void run() const {
    launch_kernel(norm_fwd_kernel<T, kVec, kIters, kRms>, blocks, threads, 0, stream, "layer_norm forward launch", p);
  }
};

struct BwdLaunch {
  BwdParams p;
  unsigned blocks;
  int threads;
  cudaStream_t stream;
  template <typename T, int kVec, int kIters, bool kRms>
  void run() const {
    launch_kernel(norm_bwd_kernel<T, kVec, kIters, kRms>, blocks, threads, 0, stream, "layer_norm backward launch", p);
  }
};

void column_sum(const float* part, int64_t parts, int64_t n, const TensorView& out,
                cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
  with_float_type(out.dtype, out.name, [&](auto t) {
    using T = decltype(t);
    launch_kernel(column_sum_kernel<T>, blocks, 256, 0, stream, "layer_norm column-sum launch", part, parts, n,
                  static_cast<T*>(out.data));
  });
}

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

DropParams drop_params(const Dropout& d) {
  return {d.p > 0.0, static_cast<float>(d.p), static_cast<float>(1.0 / (1.0 - d.p)), d.seed,
          d.seed_tensor ? static_cast<const int64_t*>(d.seed_tensor->data) : nullptr};
}

}  // namespace

void launch_forward(const ForwardArgs& a, int vec, std::uintptr_t stream) {
  DeviceGuard guard(a.x.device_id);
  FwdParams p{a.x.data, a.residual ? a.residual->data : nullptr,
              a.weight ? a.weight->data : nullptr, a.bias ? a.bias->data : nullptr,
              a.y.data, a.z ? a.z->data : nullptr,
              a.mean ? static_cast<float*>(a.mean->data) : nullptr,
              static_cast<float*>(a.rstd.data),
              a.x.shape[1], a.x.stride[0], a.residual ? a.residual->stride[0] : 0,
              a.y.stride[0], a.z ? a.z->stride[0] : 0, a.eps,
              (a.weight && a.weight->dtype == DType::kFloat32) ||
                  (a.bias && a.bias->dtype == DType::kFloat32),
              drop_params(a.dropout)};
  const Shape s = pick_shape(p.n, vec);
  by_kind(a.x.dtype, a.rms, vec, s.iters,
           FwdLaunch{p, static_cast<unsigned>(a.x.shape[0]), s.threads, as_stream(stream)});
}

void launch_backward(const BackwardArgs& a, int vec, std::uintptr_t stream) {
  DeviceGuard guard(a.dy.device_id);
  const int64_t rows = a.dy.shape[0], n = a.dy.shape[1];
  const int64_t programs = a.dw_part ? a.dw_part->shape[0] : a.db_part ? a.db_part->shape[0]
                                                                        : std::min<int64_t>(rows, 1024);
  BwdParams p{a.dy.data, a.z.data, a.weight ? a.weight->data : nullptr,
              a.dz_extra ? a.dz_extra->data : nullptr,
              a.mean ? static_cast<const float*>(a.mean->data) : nullptr,
              static_cast<const float*>(a.rstd.data), a.dz ? a.dz->data : nullptr,
              a.dx ? a.dx->data : nullptr,
              a.dweight ? static_cast<float*>(a.dw_part->data) : nullptr,
              a.dbias ? static_cast<float*>(a.db_part->data) : nullptr,
              rows, n, a.dy.stride[0], a.z.stride[0], a.dz_extra ? a.dz_extra->stride[0] : 0,
              a.dz ? a.dz->stride[0] : 0, a.dx ? a.dx->stride[0] : 0,
              (rows + programs - 1) / programs, a.weight && a.weight->dtype == DType::kFloat32,
              drop_params(a.dropout)};
  const Shape s = pick_shape(n, vec);
  cudaStream_t st = as_stream(stream);
  by_kind(a.dy.dtype, a.rms, vec, s.iters,
           BwdLaunch{p, static_cast<unsigned>(programs), s.threads, st});
  if (p.dw_part) column_sum(p.dw_part, programs, n, *a.dweight, st);
  if (p.db_part) column_sum(p.db_part, programs, n, *a.dbias, st);
}

}  // namespace fusedlm::layer_norm

// CUDA kernel for cross-entropy over a chunk of projected logits: one block per row, two passes.
//
// Pass 1: each thread keeps online statistics of its strided slice of the row (running max m,
// sum of exp(x - m), sum of x, first column holding the max); the block merges them in a fixed
// order (deterministic). Pass 2 (compute_grad): the row is overwritten in place with
//   dx_j = scale * (softmax_j (1 + 2 z lse) - (1 - eps) [j == label] - eps / V).
// The label's logit is read before any thread writes the gradient (a block barrier separates
// them), and an out-of-range label gives a NaN loss instead of an out-of-bounds read (the
// Python API rejects such labels before the kernel runs).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../common/cuda_math.cuh"
#include "../common/cuda_runtime.h"
#include "../common/dtype_dispatch.h"
#include "../common/launch.cuh"
#include "lm_loss.h"

namespace fusedlm::lm_loss {
namespace {

using math::load;
using math::store;
using math::to_float;

constexpr int kMaxThreads = 512;
constexpr long long kNoColumn = 0x7fffffffffffffffLL;

struct Params {
  void* logits;
  const int64_t* labels;
  float *loss, *lse, *hit;
  const float* row_scale;
  int64_t stride_row, vocab;
  float grad_scale, smoothing, z_loss;
  bool compute_grad;
};

struct RowStats {
  float m;        // running max
  float s;        // sum of exp(x - m)
  float total;    // sum of x
  long long arg;  // first column holding m
};

__device__ __forceinline__ float rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.0f : __expf(m_old - m_new);
}

__device__ __forceinline__ void add(RowStats& st, float x, long long col) {
  if (x > st.m) {  // strictly greater: within a thread columns rise, so the first max stays
    st.s = st.s * rescale(st.m, x) + 1.0f;
    st.m = x;
    st.arg = col;
  } else if (x != -INFINITY) {  // NaN falls here and propagates, as in the reference
    st.s += __expf(x - st.m);
  }
  st.total += x;
}

__device__ __forceinline__ RowStats merge(const RowStats& a, const RowStats& b) {
  RowStats r;
  r.m = fmaxf(a.m, b.m);
  r.s = a.s * rescale(a.m, r.m) + b.s * rescale(b.m, r.m);
  r.total = a.total + b.total;
  r.arg = a.m > b.m ? a.arg : b.m > a.m ? b.arg : (a.arg < b.arg ? a.arg : b.arg);
  return r;
}

__device__ __forceinline__ RowStats warp_merge(RowStats st) {
  for (int o = 16; o > 0; o >>= 1) {
    RowStats other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s, o),
                   __shfl_xor_sync(0xffffffffu, st.total, o),
                   __shfl_xor_sync(0xffffffffu, st.arg, o)};
    st = merge(st, other);
  }
  return st;
}

// Every thread gets the statistics of the whole row.
__device__ RowStats block_merge(RowStats st) {
  __shared__ float sm_m[32], sm_s[32], sm_total[32];
  __shared__ long long sm_arg[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  st = warp_merge(st);
  if (lane == 0) {
    sm_m[warp] = st.m;
    sm_s[warp] = st.s;
    sm_total[warp] = st.total;
    sm_arg[warp] = st.arg;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < warps ? RowStats{sm_m[lane], sm_s[lane], sm_total[lane], sm_arg[lane]}
                      : RowStats{-INFINITY, 0.0f, 0.0f, kNoColumn};
    st = warp_merge(st);
    if (lane == 0) {
      sm_m[0] = st.m;
      sm_s[0] = st.s;
      sm_total[0] = st.total;
      sm_arg[0] = st.arg;
    }
  }
  __syncthreads();
  return RowStats{sm_m[0], sm_s[0], sm_total[0], sm_arg[0]};
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kMaxThreads) ce_rows_kernel(Params p) {
  const int64_t row = blockIdx.x;
  T* base = static_cast<T*>(p.logits) + row * p.stride_row;
  const int64_t label = p.labels[row];
  const bool label_ok = label >= 0 && label < p.vocab;
  // Read before block_merge's barriers, hence before pass 2 overwrites the row.
  const float x_label = (threadIdx.x == 0 && label_ok) ? to_float(base[label]) : NAN;

  RowStats st{-INFINITY, 0.0f, 0.0f, kNoColumn};
  // Vectors over the columns in whole vectors (kVec > 1 only when every row is 16-byte
  // aligned), then one column per thread for the last V % kVec. A thread's columns still rise,
  // which the first-maximum rule of `add` relies on.
  const int64_t step = static_cast<int64_t>(blockDim.x) * kVec;
  const int64_t whole = p.vocab - p.vocab % kVec;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * kVec; c < whole; c += step) {
    float x[kVec];
    load<T, kVec>(base + c, x);
#pragma unroll
    for (int j = 0; j < kVec; ++j) add(st, x[j], c + j);
  }
  for (int64_t c = whole + threadIdx.x; c < p.vocab; c += blockDim.x) add(st, to_float(base[c]), c);
  st = block_merge(st);
  const float lse = st.m + logf(st.s);

  if (threadIdx.x == 0) {
    float loss = (1.0f - p.smoothing) * (lse - x_label);
    if (p.smoothing != 0.0f) loss += p.smoothing * (lse - st.total / static_cast<float>(p.vocab));
    loss += p.z_loss * lse * lse;
    p.loss[row] = loss;
    p.lse[row] = lse;
    p.hit[row] = st.arg == label ? 1.0f : 0.0f;
  }
  if (!p.compute_grad) return;

  const float scale = p.row_scale ? p.row_scale[row] : p.grad_scale;
  const float p_scale = scale * (1.0f + 2.0f * p.z_loss * lse);
  const float label_term = (1.0f - p.smoothing) * scale;
  const float smooth_term = p.smoothing / static_cast<float>(p.vocab) * scale;
  auto grad = [&](float x, int64_t c) {
    x = __expf(x - lse) * p_scale - smooth_term;
    return c == label ? x - label_term : x;
  };
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * kVec; c < whole; c += step) {
    float x[kVec];
    load<T, kVec>(base + c, x);
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[j] = grad(x[j], c + j);
    store<T, kVec>(base + c, x);
  }
  for (int64_t c = whole + threadIdx.x; c < p.vocab; c += blockDim.x)
    base[c] = math::from_float<T>(grad(to_float(base[c]), c));
}

struct Launch {
  Params p;
  unsigned blocks;
  int threads;
  cudaStream_t stream;
  template <typename T, int kVec>
  void run() const {
    launch_kernel(ce_rows_kernel<T, kVec>, blocks, threads, 0, stream, "lm_loss cross-entropy launch", p);
  }
};

template <typename T, typename F>
void by_vec(int vec, const F& f) {
  constexpr int kWide = 16 / sizeof(T);
  if (vec == kWide) return f.template run<T, kWide>();
  return f.template run<T, 1>();
}

template <typename F>
void by_dtype(DType d, int vec, const F& f) {
  with_float_type(d, "the CUDA LM-loss kernel",
                  [&](auto t) { by_vec<decltype(t)>(vec, f); });
}

}  // namespace

void launch_cross_entropy_rows(const CrossEntropyRowsArgs& a, int vec, std::uintptr_t stream) {
  DeviceGuard guard(a.logits.device_id);
  const int64_t vocab = a.logits.shape[1];
  Params p{a.logits.data, static_cast<const int64_t*>(a.labels.data),
           static_cast<float*>(a.loss.data), static_cast<float*>(a.lse.data),
           static_cast<float*>(a.hit.data),
           a.row_scale ? static_cast<const float*>(a.row_scale->data) : nullptr,
           a.logits.stride[0], vocab, a.grad_scale, a.smoothing, a.z_loss, a.compute_grad};
  // Enough threads that each holds a few vectors of the row, at most kMaxThreads.
  const int64_t vectors = (vocab + vec - 1) / vec;
  const int threads = static_cast<int>(
      std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (vectors / 4 + 31) / 32 * 32)));
  by_dtype(a.logits.dtype, vec,
           Launch{p, static_cast<unsigned>(a.logits.shape[0]), threads,
                  reinterpret_cast<cudaStream_t>(stream)});
}

}  // namespace fusedlm::lm_loss

// Host side of the CUDA attention: validates every argument on any build (with or without
// CUDA), then hands over to the launchers.
#include "attention.h"

#include <string>

#include "../common/cuda_runtime.h"

namespace fusedlm::attention {
namespace {

std::string shape_of(const TensorView& t) { return str(t); }

template <int N>
std::string list_of(const int (&values)[N]) {
  std::string s;
  for (int i = 0; i < N; ++i) s += (i ? ", " : "") + std::to_string(values[i]);
  return s;
}

void check_like(const TensorView& t, const TensorView& ref) {
  bool same = t.ndim == ref.ndim && t.dtype == ref.dtype;
  for (int i = 0; same && i < t.ndim; ++i) same = t.shape[i] == ref.shape[i];
  if (!same)
    throw ArgError(std::string(t.name) + " must have " + ref.name + "'s shape " + shape_of(ref) +
                   " and dtype " + dtype_name(ref.dtype) + ", got " + shape_of(t) + " " +
                   dtype_name(t.dtype));
  if (!empty(t) && t.stride[t.ndim - 1] != 1 && t.shape[t.ndim - 1] > 1)
    throw ArgError(std::string(t.name) + " must have unit stride along its last dimension");
}

void check_offsets(const TensorView& cu, int64_t batch) {
  check_vector(cu, batch + 1);
  check_dtype(cu, DType::kInt32);
}

// The (batch, heads) of a problem; validates q, k, v and the masks against each other.
void check_problem(const Problem& p) {
  const bool varlen = p.cu_q.has_value();
  if (varlen != p.cu_k.has_value()) throw ArgError("cu_seqlens_q and cu_seqlens_k go together");
  const int want = varlen ? 3 : 4;
  for (const TensorView* t : {&p.q, &p.k, &p.v}) {
    if (t->ndim != want)
      throw ArgError(std::string(t->name) + " must have " + std::to_string(want) +
                     " dimensions, got " + shape_of(*t));
    if (t->dtype != DType::kFloat16 && t->dtype != DType::kBFloat16)
      throw DTypeError(std::string(t->name) + " must be float16 or bfloat16, got " +
                       dtype_name(t->dtype));
    if (t->dtype != p.q.dtype) throw DTypeError(std::string(t->name) + " must have q's dtype");
    if (!empty(*t) && t->stride[want - 1] != 1)
      throw ArgError(std::string(t->name) + " must have unit stride along its last dimension");
  }
  const int64_t d = p.q.shape[want - 1], heads = p.q.shape[want - 2];
  const int64_t kv_heads = p.k.shape[want - 2];
  bool supported = false;
  for (int hd : kHeadDims) supported |= hd == d;
  if (!supported)
    throw ArgError("head dim must be one of " + list_of(kHeadDims) + " on the CUDA C++ kernel, got " +
                   std::to_string(d));
  for (int i = 0; i < want; ++i)
    if (p.v.shape[i] != p.k.shape[i])
      throw ArgError("v must have k's shape " + shape_of(p.k) + ", got " + shape_of(p.v));
  if (p.k.shape[want - 1] != d) throw ArgError("k must have q's head dim " + std::to_string(d));
  if (kv_heads < 1 || heads % kv_heads)
    throw ArgError("k's heads (" + std::to_string(kv_heads) + ") must divide q's (" +
                   std::to_string(heads) + ")");
  if (heads > 65535) throw ArgError("q must have at most 65535 heads");
  if (varlen) {
    const int64_t batch = p.cu_q->shape[0] - 1;
    if (p.cu_q->ndim != 1 || batch < 0) throw ArgError("cu_seqlens_q must be a vector of offsets");
    check_offsets(*p.cu_q, batch);
    check_offsets(*p.cu_k, batch);
    if (batch > 65535) throw ArgError("at most 65535 sequences in one call");
    if (p.key_mask) throw ArgError("key_mask is for dense batches; packed ones need none");
    if (p.max_q < 0 || p.max_k < 0) throw ArgError("max_seqlen must be non-negative");
  } else {
    if (p.k.shape[0] != p.q.shape[0]) throw ArgError("k must have q's batch size");
    if (p.q.shape[0] > 65535) throw ArgError("batch must be at most 65535");
    if (p.max_q != p.q.shape[1] || p.max_k != p.k.shape[1])
      throw ArgError("max_seqlen must equal the dense sequence lengths");
    if (p.key_mask) {
      check_matrix(*p.key_mask, p.q.shape[0], p.k.shape[1]);
      if (p.key_mask->dtype != DType::kInt8)
        throw DTypeError(std::string("key_mask must be int8, got ") + dtype_name(p.key_mask->dtype));
    }
  }
  if (!(p.scale > 0.0f)) throw ArgError("softmax_scale must be positive");
  if (!(p.dropout_p >= 0.0f && p.dropout_p < 1.0f))
    throw ArgError("dropout_p must be in [0, 1), got " + std::to_string(p.dropout_p));
}

void check_lse(const TensorView& lse, const Problem& p) {
  check_dtype(lse, DType::kFloat32);
  const bool varlen = p.cu_q.has_value();
  const int h = varlen ? 1 : 2;
  const int64_t heads = p.q.shape[h];
  const bool shaped = varlen ? lse.ndim == 2 && lse.shape[0] == heads && lse.shape[1] == p.q.shape[0]
                             : lse.ndim == 3 && lse.shape[0] == p.q.shape[0] && lse.shape[1] == heads &&
                                   lse.shape[2] == p.q.shape[1];
  const bool ok = shaped && (empty(lse) || (varlen ? (lse.shape[1] <= 1 || lse.stride[1] == 1) && lse.stride[0] == lse.shape[1]
                                              : (lse.shape[2] <= 1 || lse.stride[2] == 1) &&
                                                    lse.stride[1] == lse.shape[2] &&
                                                    lse.stride[0] == heads * lse.shape[2]));
  if (!ok)
    throw ArgError(std::string(lse.name) + " must be contiguous float32 " +
                   (varlen ? "(heads, total_q)" : "(batch, heads, seq_q)") + ", got " + shape_of(lse));
}

void check_devices(const Problem& p, std::initializer_list<const TensorView*> more) {
  for (const TensorView* t : {&p.q, &p.k, &p.v}) check_same_device(*t, p.q);
  for (const auto* t : {&p.key_mask, &p.cu_q, &p.cu_k})
    if (*t) check_same_device(**t, p.q);
  for (const TensorView* t : more) check_same_device(*t, p.q);
  if (!built_with_cuda())
    throw_built_without_cuda();
}

}  // namespace

std::string forward(const ForwardArgs& a, std::uintptr_t stream) {
  check_problem(a.p);
  check_like(a.o, a.p.q);
  check_lse(a.lse, a.p);
  // Device checks come last, so shape and dtype errors read the same on any machine.
  check_devices(a.p, {&a.o, &a.lse});
  if (a.p.q.shape[0] == 0) return "none (empty)";
  return launch_forward(a, stream);
}

std::string backward(const BackwardArgs& a, std::uintptr_t stream) {
  check_problem(a.p);
  check_like(a.o, a.p.q);
  check_like(a.dout, a.p.q);
  check_like(a.dq, a.p.q);
  check_like(a.dk, a.p.k);
  check_like(a.dv, a.p.v);
  check_lse(a.lse, a.p);
  check_lse(a.delta, a.p);
  check_devices(a.p, {&a.o, &a.dout, &a.lse, &a.delta, &a.dq, &a.dk, &a.dv});
  if (a.p.q.shape[0] == 0 && a.p.k.shape[0] == 0) return "none (empty)";
  return launch_backward(a, stream);
}

void wgmma_probe(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& raw,
                 const TensorView& s, const TensorView& s_wide, const TensorView& o, std::uintptr_t stream) {
  const int64_t d = q.ndim == 3 ? q.shape[2] : 0;
  const auto contiguous = [](const TensorView& t) {
    int64_t step = 1;
    for (int i = t.ndim - 1; i >= 0; --i) {
      if (t.shape[i] > 1 && t.stride[i] != step) return false;
      step *= t.shape[i];
    }
    return true;
  };
  if (q.ndim != 3 || q.shape[0] != 64 || q.shape[1] != 1 || (d != 64 && d != 128) || !contiguous(q))
    throw ArgError("q must be a contiguous (64, 1, D) tensor with D 64 or 128, got " + shape_of(q));
  if (q.dtype != DType::kFloat16 && q.dtype != DType::kBFloat16)
    throw DTypeError(std::string("q must be float16 or bfloat16, got ") + dtype_name(q.dtype));
  if (k.ndim != 3 || k.shape[0] != 128 || k.shape[1] != 1 || k.shape[2] != d || k.dtype != q.dtype || !contiguous(k))
    throw ArgError("k must be a contiguous (128, 1, " + std::to_string(d) + ") tensor of q's dtype, got " +
                   shape_of(k) + " " + dtype_name(k.dtype));
  for (const TensorView* t : {&v, &raw}) {
    check_like(*t, q);
    if (!contiguous(*t)) throw ArgError(std::string(t->name) + " must be contiguous");
  }
  for (const auto& [t, cols] : {std::pair<const TensorView*, int64_t>{&s, 64}, {&s_wide, 128}, {&o, d}}) {
    check_dtype(*t, DType::kFloat32);
    if (t->ndim != 2 || t->shape[0] != 64 || t->shape[1] != cols || !contiguous(*t))
      throw ArgError(std::string(t->name) + " must be a contiguous (64, " + std::to_string(cols) +
                     ") float32 tensor, got " + shape_of(*t));
  }
  for (const TensorView* t : {&k, &v, &raw, &s, &s_wide, &o}) check_same_device(*t, q);
  if (!built_with_cuda()) throw_built_without_cuda();
  launch_wgmma_probe(q, k, v, raw, s, s_wide, o, stream);
}

#ifndef FUSEDLM_WITH_CUDA
std::string launch_forward(const ForwardArgs&, std::uintptr_t) {
  throw_built_without_cuda();
}
std::string launch_backward(const BackwardArgs&, std::uintptr_t) {
  throw_built_without_cuda();
}
void launch_wgmma_probe(const TensorView&, const TensorView&, const TensorView&, const TensorView&,
                        const TensorView&, const TensorView&, const TensorView&, std::uintptr_t) {
  throw_built_without_cuda();
}
#endif

}  // namespace fusedlm::attention

// The only pybind11 file: turns DLPack capsules into TensorViews, calls the ops' host code, and
// maps C++ errors to Python ones (ArgError -> ValueError, DTypeError -> TypeError).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "common/cuda_runtime.h"
#include "common/philox.h"
#include "common/tensor.h"
#include "attention/attention.h"
#include "layer_norm/layer_norm.h"
#include "lm_loss/lm_loss.h"
#ifdef FUSEDLM_EMULATED
#include "emu/selftest.h"
#endif

namespace py = pybind11;
using fusedlm::TensorView;

namespace {

// Borrows the tensor behind a DLPack capsule; the caller's capsule keeps it alive for the call
// (we do not take ownership, so the capsule's own destructor frees it as usual).
TensorView tensor(const py::handle& h, const char* name) {
  if (!PyCapsule_IsValid(h.ptr(), fusedlm::dlpack::kCapsuleName))
    throw fusedlm::DTypeError(std::string(name) +
                              " must be an unconsumed DLPack capsule (torch.utils.dlpack.to_dlpack)");
  auto* m = static_cast<fusedlm::dlpack::ManagedTensor*>(
      PyCapsule_GetPointer(h.ptr(), fusedlm::dlpack::kCapsuleName));
  return fusedlm::view_of(m->dl_tensor, name);
}

std::optional<TensorView> optional_tensor(const py::handle& h, const char* name) {
  if (h.is_none()) return std::nullopt;
  return tensor(h, name);
}

py::dict build_info() {
  py::dict d;
#ifdef FUSEDLM_EMULATED
  d["cuda"] = false;  // the kernels are built, for the CPU emulator: not for a GPU
  d["emulated"] = true;
  d["emu_sanitize"] = FUSEDLM_EMU_SANITIZE;
#else
  d["cuda"] = fusedlm::built_with_cuda();
  d["emulated"] = false;
#endif
  d["cuda_mode"] = FUSEDLM_CUDA_MODE;
  d["cuda_archs"] = FUSEDLM_CUDA_ARCHS;
  d["cuda_compiler"] = FUSEDLM_CUDA_COMPILER_VERSION;
  d["gpus"] = fusedlm::cuda_device_count();
  d["gpu_status"] = fusedlm::cuda_status();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedlm's compiled core: CUDA C++ kernels behind DLPack, no libtorch";
  // The CPU emulator's build (FUSEDLM_CUDA=EMU): the kernels take CPU tensors. A constant, so
  // that asking touches no GPU.
#ifdef FUSEDLM_EMULATED
  m.attr("EMULATED") = true;
  m.def("emu_selftest_reverse", &fusedlm::emu::selftest_reverse, py::arg("values"), py::arg("barrier"),
        py::arg("extra_smem") = 0,
        "The values reversed through shared memory, with or without the barrier between.");
  m.def("emu_selftest_static_shared", &fusedlm::emu::selftest_static_shared, py::arg("blocks"),
        py::arg("write"), "What each block reads of a static shared array before writing it.");
  m.def("emu_selftest_mma", &fusedlm::emu::selftest_mma, py::arg("a"), py::arg("b"), py::arg("bf16"),
        py::arg("trans"), py::arg("barrier"),
        "A B (16 x 16 each, row-major) through shared memory, ldmatrix and mma.sync.");
  m.def("emu_selftest_to_half", &fusedlm::emu::selftest_to_half, py::arg("values"), py::arg("bf16"));
  m.def("emu_selftest_from_half", &fusedlm::emu::selftest_from_half, py::arg("bits"), py::arg("bf16"));
  m.def("emu_selftest_read_past_end", &fusedlm::emu::selftest_read_past_end, py::arg("values"));
  m.def("emu_selftest_partial_warp", &fusedlm::emu::selftest_partial_warp,
        "Runs an ldmatrix that one lane has left: raises the emulator's error for it.");
  m.def("emu_selftest_divergent", &fusedlm::emu::selftest_divergent,
        "Runs a kernel whose barriers never open: raises the emulator's deadlock error.");
#else
  m.attr("EMULATED") = false;
#endif
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const fusedlm::DTypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  m.def("build_info", &build_info, "How this core was built, and which GPUs it sees.");
  m.def("norm_max_columns", [] { return fusedlm::layer_norm::kMaxColumns; });
  m.def("attention_head_dims", [] {
    return std::vector<int>(std::begin(fusedlm::attention::kHeadDims),
                            std::end(fusedlm::attention::kHeadDims));
  });

  m.def(
      "norm_fwd",
      [](py::handle x, py::handle residual, py::handle weight, py::handle bias, py::handle y,
         py::handle z, py::handle mean, py::handle rstd, float eps, bool rms,
         std::uintptr_t stream, double dropout_p, uint64_t seed, py::handle seed_tensor) {
        fusedlm::layer_norm::ForwardArgs a{
            tensor(x, "x"), optional_tensor(residual, "residual"),
            optional_tensor(weight, "weight"), optional_tensor(bias, "bias"), tensor(y, "y"),
            optional_tensor(z, "z"), optional_tensor(mean, "mean"), tensor(rstd, "rstd"), eps,
            rms, {dropout_p, seed, optional_tensor(seed_tensor, "seed_tensor")}};
        py::gil_scoped_release release;
        fusedlm::layer_norm::forward(a, stream);
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("y"),
      py::arg("z"), py::arg("mean"), py::arg("rstd"), py::arg("eps"), py::arg("rms"),
      py::arg("stream"), py::arg("dropout_p") = 0.0, py::arg("seed") = 0,
      py::arg("seed_tensor") = py::none(),
      "Layer norm / RMSNorm forward over rows of dropout(x) (+ residual); outputs are "
      "preallocated. The dropout seed by value, or in seed_tensor (one int64 on the device).");

  m.def(
      "norm_bwd",
      [](py::handle dy, py::handle z, py::handle weight, py::handle mean, py::handle rstd,
         py::handle dz_extra, py::handle dz, py::handle dw_part, py::handle db_part,
         py::handle dweight, py::handle dbias, bool rms, std::uintptr_t stream, py::handle dx,
         double dropout_p, uint64_t seed, py::handle seed_tensor) {
        fusedlm::layer_norm::BackwardArgs a{
            tensor(dy, "dy"), tensor(z, "z"), optional_tensor(weight, "weight"),
            optional_tensor(mean, "mean"), tensor(rstd, "rstd"),
            optional_tensor(dz_extra, "dz_extra"), optional_tensor(dz, "dz"),
            optional_tensor(dx, "dx"), optional_tensor(dw_part, "dw_part"),
            optional_tensor(db_part, "db_part"), optional_tensor(dweight, "dweight"),
            optional_tensor(dbias, "dbias"), rms,
            {dropout_p, seed, optional_tensor(seed_tensor, "seed_tensor")}};
        py::gil_scoped_release release;
        fusedlm::layer_norm::backward(a, stream);
      },
      py::arg("dy"), py::arg("z"), py::arg("weight"), py::arg("mean"), py::arg("rstd"),
      py::arg("dz_extra"), py::arg("dz"), py::arg("dw_part"), py::arg("db_part"),
      py::arg("dweight"), py::arg("dbias"), py::arg("rms"), py::arg("stream"),
      py::arg("dx") = py::none(), py::arg("dropout_p") = 0.0, py::arg("seed") = 0,
      py::arg("seed_tensor") = py::none(),
      "Layer norm / RMSNorm backward: dz (the sum's gradient), with dropout dx (x's), and "
      "dweight/dbias through per-block partials.");

  m.def(
      "lm_ce_rows",
      [](py::handle logits, py::handle labels, py::handle loss, py::handle lse, py::handle hit,
         py::handle row_scale, float grad_scale, float smoothing, float z_loss, bool compute_grad,
         std::uintptr_t stream) {
        fusedlm::lm_loss::CrossEntropyRowsArgs a{
            tensor(logits, "logits"), tensor(labels, "labels"), tensor(loss, "loss"),
            tensor(lse, "lse"), tensor(hit, "hit"), optional_tensor(row_scale, "row_scale"),
            grad_scale, smoothing, z_loss, compute_grad};
        py::gil_scoped_release release;
        fusedlm::lm_loss::cross_entropy_rows(a, stream);
      },
      py::arg("logits"), py::arg("labels"), py::arg("loss"), py::arg("lse"), py::arg("hit"),
      py::arg("row_scale"), py::arg("grad_scale"), py::arg("smoothing"), py::arg("z_loss"),
      py::arg("compute_grad"), py::arg("stream"),
      "Cross-entropy of each row of a logits chunk; with compute_grad, the row's gradient "
      "overwrites it.");

  m.def(
      "attn_fwd",
      [](py::handle q, py::handle k, py::handle v, py::handle key_mask, py::handle cu_q,
         py::handle cu_k, int64_t max_q, int64_t max_k, bool causal, float scale, float dropout_p,
         uint64_t seed, py::handle o, py::handle lse, std::uintptr_t stream, bool wgmma) {
        fusedlm::attention::ForwardArgs a{
            {tensor(q, "q"), tensor(k, "k"), tensor(v, "v"), optional_tensor(key_mask, "key_mask"),
             optional_tensor(cu_q, "cu_seqlens_q"), optional_tensor(cu_k, "cu_seqlens_k"), max_q,
             max_k, causal, scale, dropout_p, seed},
            tensor(o, "out"), tensor(lse, "lse"), wgmma};
        py::gil_scoped_release release;
        return fusedlm::attention::forward(a, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_mask"), py::arg("cu_q"),
      py::arg("cu_k"), py::arg("max_q"), py::arg("max_k"), py::arg("causal"), py::arg("scale"),
      py::arg("dropout_p"), py::arg("seed"),
      py::arg("out"), py::arg("lse"), py::arg("stream"), py::arg("wgmma") = false,
      "Attention forward: out, and the base-2 log-sum-exp of the scaled scores. With wgmma, the "
      "Hopper kernel runs where it can. Returns the kernel that ran.");
  m.def(
      "attn_bwd",
      [](py::handle q, py::handle k, py::handle v, py::handle key_mask, py::handle cu_q,
         py::handle cu_k, int64_t max_q, int64_t max_k, bool causal, float scale, float dropout_p,
         uint64_t seed, py::handle out, py::handle dout, py::handle lse, py::handle delta,
         py::handle dq, py::handle dk, py::handle dv, std::uintptr_t stream, bool wgmma) {
        fusedlm::attention::BackwardArgs a{
            {tensor(q, "q"), tensor(k, "k"), tensor(v, "v"), optional_tensor(key_mask, "key_mask"),
             optional_tensor(cu_q, "cu_seqlens_q"), optional_tensor(cu_k, "cu_seqlens_k"), max_q,
             max_k, causal, scale, dropout_p, seed},
            tensor(out, "out"), tensor(dout, "dout"), tensor(lse, "lse"), tensor(delta, "delta"),
            tensor(dq, "dq"),
            tensor(dk, "dk"), tensor(dv, "dv"), wgmma};
        py::gil_scoped_release release;
        return fusedlm::attention::backward(a, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_mask"), py::arg("cu_q"),
      py::arg("cu_k"), py::arg("max_q"), py::arg("max_k"), py::arg("causal"), py::arg("scale"),
      py::arg("dropout_p"), py::arg("seed"), py::arg("out"),
      py::arg("dout"), py::arg("lse"), py::arg("delta"), py::arg("dq"), py::arg("dk"),
      py::arg("dv"), py::arg("stream"), py::arg("wgmma") = false,
      "Attention backward: dq, dk, dv from the forward's output and saved log-sum-exp; delta is "
      "scratch laid out as lse, where it leaves rowsum(dO * O) (as the Triton backward does). With "
      "wgmma, the Hopper kernels run where they can. Returns the kernels that ran.");
  m.def(
      "attention_wgmma_probe",
      [](py::handle q, py::handle k, py::handle v, py::handle raw, py::handle s, py::handle s_wide,
         py::handle o, std::uintptr_t stream) {
        const auto tq = tensor(q, "q"), tk = tensor(k, "k"), tv = tensor(v, "v"), traw = tensor(raw, "raw"),
                   ts = tensor(s, "s"), tsw = tensor(s_wide, "s_wide"), to = tensor(o, "o");
        py::gil_scoped_release release;
        fusedlm::attention::wgmma_probe(tq, tk, tv, traw, ts, tsw, to, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("raw"), py::arg("s"), py::arg("s_wide"),
      py::arg("o"), py::arg("stream"),
      "The Hopper kernels' primitives, one at a time (attention.h: wgmma_probe): raw gets q's "
      "tile as TMA left it in shared memory, s = q k[:64]^T and s_wide = q k^T (SS wgmma, N 64 "
      "and 128), o = round(s) v (RS, v MN-major).");
  m.def(
      "dropout_keep",
      [](uint64_t seed, uint64_t rows, uint64_t cols, float p_drop, bool counter32) {
        std::vector<bool> out(rows * cols);
        const uint32_t least = fusedlm::dropout_least(p_drop);
        for (uint64_t r = 0; r < rows; ++r)
          for (uint64_t c = 0; c < cols; ++c) {
            uint64_t counter = fusedlm::dropout_counter(r, cols, c);
            if (counter32) counter = static_cast<uint32_t>(counter);
            out[r * cols + c] = fusedlm::dropout_keep(seed, counter, static_cast<uint32_t>(c), least);
          }
        return out;
      },
      py::arg("seed"), py::arg("rows"), py::arg("cols"), py::arg("p_drop"), py::arg("counter32"),
      "The dropout keep-mask of a (rows, cols) stream as the CUDA C++ kernels draw it "
      "(common/philox.h), computed on the host: for tests. counter32: the attention kernels' "
      "32-bit counter.");
}

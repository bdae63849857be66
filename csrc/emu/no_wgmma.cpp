// The emulated build has no Hopper kernels (wgmma, TMA and mbarriers are sm_90a instructions):
// attention_hopper.cu is not compiled, and these say so where the mma.sync launcher asks.
#include <stdexcept>

#include "emu.h"  // first: the device-code keywords the shared header uses
#include "../attention/attention_device.cuh"

namespace fusedlm::attention::detail {

std::string wgmma_unavailable(const Problem&, const Params&, bool) {
  return "the CPU emulator has no sm_90a code";
}

void launch_forward_wgmma(const Problem&, const Params&, std::uintptr_t) {
  throw std::logic_error("the CPU emulator has no wgmma kernels");
}

void launch_backward_wgmma(const Problem&, const Params&, std::uintptr_t) {
  throw std::logic_error("the CPU emulator has no wgmma kernels");
}

}  // namespace fusedlm::attention::detail

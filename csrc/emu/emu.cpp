// The CPU emulator's scheduler and runtime (see emu.h): fibers, one block at a time.
#include "emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>


// ---- switching between fibers ---------------------------------------------------------------
// On x86-64, our own switch: it saves what a call must preserve (the callee-saved registers, the
// stack pointer, the SSE and x87 control words) and nothing else. swapcontext also saves and
// restores the signal mask, two system calls a switch; with warp collectives (ldmatrix, mma.sync)
// a barrier each, they took about 40% of the emulated suite's time. Elsewhere (or built with
// FUSEDLM_EMU_UCONTEXT defined), ucontext.
#if defined(__x86_64__) && !defined(FUSEDLM_EMU_UCONTEXT)
#define FUSEDLM_EMU_OWN_SWITCH 1
extern "C" void fusedlm_emu_switch(void** save_sp, void* load_sp);
extern "C" void fusedlm_emu_fiber_start();
asm(R"(
    .text
    .globl fusedlm_emu_switch
    .type fusedlm_emu_switch, @function
fusedlm_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fusedlm_emu_switch, .-fusedlm_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
#endif

// The address sanitizer must be told when a fiber switch changes stacks (its fiber API).
#if defined(__SANITIZE_ADDRESS__)
#define FUSEDLM_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FUSEDLM_EMU_ASAN 1
#endif
#endif
#ifdef FUSEDLM_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace fusedlm::emu {
namespace {

// A fiber's stack: the kernels' locals are small, and a sanitized build clears a stack's shadow
// before each block (prepare), so a smaller stack is a faster sanitized run. Below it, one
// inaccessible guard page: an overflow faults, never corrupts.
constexpr size_t kStackBytes = 64 * 1024, kGuardBytes = 4096;
constexpr int kMaxThreads = 1024;
constexpr int kDefaultSmem = 48 * 1024;
constexpr int kMaxSmem = 166912;  // an A100's opt-in limit per block: the sm_80 code paths run here

enum class Wait { kRunnable, kBlock, kWarp, kDone };

struct Copy {
  void* dst;
  const void* src;
  int bytes;
  long group;  // the commit group it belongs to (the fiber's `committed` count when issued)
};

struct Fiber {
#ifdef FUSEDLM_EMU_OWN_SWITCH
  void* sp = nullptr;  // its saved stack pointer while it is switched out
#else
  ucontext_t ctx;
#endif
  void* fake_stack = nullptr;  // the address sanitizer's, across its switches
  void* stack = nullptr;
  ThreadState st;
  int warp = 0, lane = 0;
  Wait wait = Wait::kRunnable;
  int line = 0;
  std::vector<Copy> copies;  // cp.async copies issued and not yet waited for
  long committed = 0;        // cp.async groups committed so far
  long collectives = 0;      // warp collectives so far: picks the bank
};

// A warp's slots for its collectives (a shuffle, ldmatrix, mma.sync), kSlotBytes a lane, in two
// banks used by turns: a lane cannot put into a bank again before every lane has read it,
// since between the two it passes the barrier of the collective in the other bank, which no
// lane reaches before reading. So each collective needs one barrier, not two.
struct Warp {
  int size = 0, waiting = 0, done = 0;
  int opened_with = 0;  // how many lanes had arrived when its barrier last opened
  unsigned char slot[2][32][kSlotBytes] = {};
};

// The block being run.
struct Block {
  std::vector<Fiber> fibers;  // in thread order
  std::vector<Warp> warps;
  std::vector<int> order;     // scheduling order: thread order or its reverse
  int waiting = 0, done = 0;
  size_t cursor = 0;          // position in `order` the scheduler resumes from
  Fiber* running = nullptr;
#ifdef FUSEDLM_EMU_OWN_SWITCH
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif
  // The scheduler's stack, for the address sanitizer's switches back to it.
  const void* scheduler_bottom = nullptr;
  size_t scheduler_size = 0;
  void* scheduler_fake_stack = nullptr;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;  // thrown in a fiber: ends the block, rethrown by the scheduler
  bool copies_at_issue = false;
  std::vector<unsigned char> smem;
};

Block* g_block = nullptr;
cudaError_t g_last_error = cudaSuccess;
std::map<const void*, int> g_smem_limit;  // per kernel, as cudaFuncSetAttribute set it
std::vector<void*> g_stacks;              // reused across launches

void* stack_at(size_t i) {
  while (g_stacks.size() <= i) {
    void* p = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED || mprotect(p, kGuardBytes, PROT_NONE) != 0)
      throw std::runtime_error("fusedlm emulator: cannot map a fiber stack");
    g_stacks.push_back(static_cast<unsigned char*>(p) + kGuardBytes);
  }
  return g_stacks[i];
}

// Wakes the threads waiting at the block's barrier, or at warp `warp`'s; the next phase starts
// again from the first of them in scheduling order.
void release_block(Block& b) {
  for (Fiber& o : b.fibers)
    if (o.wait == Wait::kBlock) o.wait = Wait::kRunnable;
  b.waiting = 0;
  b.cursor = 0;
}

void release_warp(Block& b, int warp) {
  bool first = true;
  for (size_t k = 0; k < b.order.size(); ++k) {
    Fiber& o = b.fibers[b.order[k]];
    if (o.warp == warp && o.wait == Wait::kWarp) {
      o.wait = Wait::kRunnable;
      if (first) b.cursor = k;
      first = false;
    }
  }
  b.warps[warp].opened_with = b.warps[warp].waiting;
  b.warps[warp].waiting = 0;
}

// A barrier opens when every thread of its scope has arrived or finished (a finished thread
// counts as arrived, as on a GPU).
void maybe_release(Block& b, int warp) {
  const Warp& w = b.warps[warp];
  if (w.waiting > 0 && w.waiting + w.done == w.size) release_warp(b, warp);
  if (b.waiting > 0 && b.waiting + b.done == static_cast<int>(b.fibers.size())) release_block(b);
}

// From the scheduler into fiber f, until it yields or finishes.
void enter(Block& b, Fiber& f) {
#ifdef FUSEDLM_EMU_ASAN
  __sanitizer_start_switch_fiber(&b.scheduler_fake_stack, f.stack, kStackBytes);
#endif
#ifdef FUSEDLM_EMU_OWN_SWITCH
  fusedlm_emu_switch(&b.scheduler_sp, f.sp);
#else
  swapcontext(&b.scheduler, &f.ctx);
#endif
#ifdef FUSEDLM_EMU_ASAN
  __sanitizer_finish_switch_fiber(b.scheduler_fake_stack, nullptr, nullptr);
#endif
}

// From the running fiber back to the scheduler; returns when the scheduler enters it again
// (never, once `finished`).
void leave(Block& b, Fiber& f, bool finished) {
#ifdef FUSEDLM_EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, b.scheduler_bottom, b.scheduler_size);
#endif
#ifdef FUSEDLM_EMU_OWN_SWITCH
  fusedlm_emu_switch(&f.sp, b.scheduler_sp);
#else
  swapcontext(&f.ctx, &b.scheduler);
#endif
#ifdef FUSEDLM_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &b.scheduler_bottom, &b.scheduler_size);
#endif
}

void fiber_main() {
  Block& b = *g_block;
#ifdef FUSEDLM_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_bottom, &b.scheduler_size);
#endif
  try {  // an exception cannot leave a fiber: the scheduler rethrows it
    (*b.body)();
  } catch (...) {
    b.error = std::current_exception();
  }
  Fiber& f = *b.running;
  f.wait = Wait::kDone;
  ++b.done;
  ++b.warps[f.warp].done;
  maybe_release(b, f.warp);
  leave(b, f, true);
  std::abort();  // a finished fiber is never entered again
}

// Back to the scheduler until this fiber may run again.
void yield_until_released() {
  Block& b = *g_block;
  leave(b, *b.running, false);
}

// Fiber f's first entry runs fiber_main on its own stack.
void prepare(Block& b, Fiber& f) {
#ifdef FUSEDLM_EMU_ASAN
  // The stack is reused: what the sanitizer marked in it for the last block's frames is stale.
  __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
#ifdef FUSEDLM_EMU_OWN_SWITCH
  (void)b;
  // What fusedlm_emu_switch pops, from the stack's top down: a zero return address for
  // fusedlm_emu_fiber_start (entered by `ret` as if called: 8 bytes past a 16-byte boundary),
  // its address, six callee-saved registers, then the control words now in force.
  void** sp = reinterpret_cast<void**>(static_cast<unsigned char*>(f.stack) + kStackBytes);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fusedlm_emu_fiber_start);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  --sp;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<unsigned char*>(sp) + 4, &fpucw, 2);
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = &b.scheduler;
  makecontext(&f.ctx, fiber_main, 0);
#endif
}

std::string describe_deadlock(const Block& b) {
  std::map<std::string, int> where;
  for (const Fiber& f : b.fibers) {
    if (f.wait == Wait::kBlock) ++where["__syncthreads at line " + std::to_string(f.line)];
    if (f.wait == Wait::kWarp) ++where["a warp barrier (__syncwarp or a shuffle) at line " + std::to_string(f.line)];
  }
  std::string s;
  for (const auto& [what, n] : where) s += (s.empty() ? "" : "; ") + std::to_string(n) + " thread(s) wait at " + what;
  return s;
}

void run_block(Block& b) {
  const size_t n = b.fibers.size();
  while (b.done < static_cast<int>(n)) {
    // The next runnable fiber from the cursor, in scheduling order.
    Fiber* next = nullptr;
    for (size_t k = 0; k < n && !next; ++k) {
      Fiber& f = b.fibers[b.order[(b.cursor + k) % n]];
      if (f.wait == Wait::kRunnable) {
        next = &f;
        b.cursor = (b.cursor + k) % n;
      }
    }
    if (!next) {
      const ThreadState& s = b.fibers[0].st;
      throw std::runtime_error("fusedlm emulator: deadlock in block (" + std::to_string(s.block_idx.x) + ", " +
                               std::to_string(s.block_idx.y) + ", " + std::to_string(s.block_idx.z) +
                               "): " + describe_deadlock(b));
    }
    b.running = next;
    enter(b, *next);
    b.running = nullptr;
    if (b.error) std::rethrow_exception(b.error);
  }
}

// FUSEDLM_EMU_COPIES: when a cp.async copy lands. "at-wait" (the default): at its thread's wait
// for its group, so a tile read before the wait is stale. "at-issue": at once, so a copy into a
// buffer that another warp has not finished reading (a prefetch with no barrier before it)
// overwrites what that warp still reads.
bool copies_at_issue() {
  const char* v = std::getenv("FUSEDLM_EMU_COPIES");
  if (!v || !*v || std::string(v) == "at-wait") return false;
  if (std::string(v) == "at-issue") return true;
  throw std::runtime_error(std::string("FUSEDLM_EMU_COPIES must be 'at-wait' or 'at-issue', got '") + v + "'");
}

bool reverse_order() {
  const char* v = std::getenv("FUSEDLM_EMU_ORDER");
  if (!v || !*v || std::string(v) == "forward") return false;
  if (std::string(v) == "reverse") return true;
  throw std::runtime_error(std::string("FUSEDLM_EMU_ORDER must be 'forward' or 'reverse', got '") + v + "'");
}

}  // namespace

const ThreadState& current() { return g_block->running->st; }
int lane() { return g_block->running->lane; }
unsigned char* dynamic_smem() { return g_block->smem.data(); }

void sync_block(int line) {
  Block& b = *g_block;
  Fiber& f = *b.running;
  f.wait = Wait::kBlock;
  f.line = line;
  ++b.waiting;
  maybe_release(b, f.warp);
  yield_until_released();
}

void sync_warp(int line) {
  Block& b = *g_block;
  Fiber& f = *b.running;
  f.wait = Wait::kWarp;
  f.line = line;
  ++b.warps[f.warp].waiting;
  maybe_release(b, f.warp);
  yield_until_released();
}

const unsigned char* collective(const void* mine, size_t bytes, bool full_warp, int line) {
  if (bytes > kSlotBytes) throw std::runtime_error("fusedlm emulator: a lane puts at most 64 bytes into a collective");
  Block& b = *g_block;
  Fiber& f = *b.running;
  Warp& w = b.warps[f.warp];
  unsigned char(&bank)[32][kSlotBytes] = w.slot[f.collectives++ % 2];
  std::memcpy(bank[f.lane], mine, bytes);
  sync_warp(line);  // every lane has put
  if (full_warp && w.opened_with < 32)
    throw std::runtime_error("fusedlm emulator: a warp-collective matrix instruction at line " + std::to_string(line) +
                             " ran with " + std::to_string(w.opened_with) + " of 32 lanes (it needs all 32)");
  return bank[0];
}

uint64_t exchange(uint64_t bits, int src, int line) {
  const unsigned char* slots = collective(&bits, sizeof bits, false, line);
  if (src >= 0 && src < g_block->warps[g_block->running->warp].size) std::memcpy(&bits, slots + src * kSlotBytes, 8);
  return bits;
}

static void land(const Copy& c) {
  std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
  std::memset(static_cast<unsigned char*>(c.dst) + c.bytes, 0, static_cast<size_t>(16 - c.bytes));
}

void cp_async(void* dst, const void* src, int bytes) {
  Fiber& f = *g_block->running;
  const Copy c{dst, src, bytes, f.committed};
  if (g_block->copies_at_issue)
    land(c);
  else
    f.copies.push_back(c);
}

void cp_async_commit() { ++g_block->running->committed; }

void cp_async_wait_group(int pending) {
  Fiber& f = *g_block->running;
  std::vector<Copy> left;
  for (const Copy& c : f.copies) {
    if (c.group < f.committed - pending) {
      land(c);
    } else {
      left.push_back(c);
    }
  }
  f.copies.swap(left);
}

void cp_async_wait_all() {
  cp_async_commit();  // as PTX defines cp.async.wait_all: commit, then wait for every group
  cp_async_wait_group(0);
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const long long threads = 1LL * block.x * block.y * block.z;
  if (threads < 1 || threads > kMaxThreads || block.z > 64 || grid.x < 1 || grid.y < 1 || grid.z < 1 ||
      grid.y > 65535 || grid.z > 65535) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const auto limit = g_smem_limit.find(kernel);
  if (smem > static_cast<size_t>(limit == g_smem_limit.end() ? kDefaultSmem : limit->second)) {
    g_last_error = cudaErrorInvalidValue;  // what a GPU reports for too much dynamic shared memory
    return;
  }
  const bool reverse = reverse_order();
  Block b;
  b.copies_at_issue = copies_at_issue();
  b.body = &body;
  b.fibers.resize(static_cast<size_t>(threads));
  b.warps.resize(static_cast<size_t>((threads + 31) / 32));
  for (size_t i = 0; i < b.warps.size(); ++i)
    b.warps[i].size = static_cast<int>(std::min<long long>(32, threads - 32 * static_cast<long long>(i)));
  for (long long i = 0; i < threads; ++i) b.order.push_back(static_cast<int>(reverse ? threads - 1 - i : i));
  Block* saved = g_block;
  g_block = &b;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          b.smem.assign(smem, 0xff);  // NaN in fp32, fp16 and bf16: reading before writing shows
          b.waiting = b.done = 0;
          b.cursor = 0;
          b.error = nullptr;
          for (Warp& w : b.warps) w.waiting = w.done = 0;
          for (long long i = 0; i < threads; ++i) {
            Fiber& f = b.fibers[static_cast<size_t>(i)];
            f.warp = static_cast<int>(i / 32);
            f.lane = static_cast<int>(i % 32);
            f.wait = Wait::kRunnable;
            f.copies.clear();  // a copy never waited for never lands
            f.committed = 0;
            f.collectives = 0;
            f.st.thread_idx = {static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
                               static_cast<unsigned>(i / (1LL * block.x * block.y))};
            f.st.block_idx = {x, y, z};
            f.st.block_dim = block;
            f.st.grid_dim = grid;
            f.stack = stack_at(static_cast<size_t>(i));
            f.fake_stack = nullptr;
            prepare(b, f);
          }
          run_block(b);
        }
  } catch (...) {
    g_block = saved;
    throw;
  }
  g_block = saved;
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > kMaxSmem) return g_last_error = cudaErrorInvalidValue;
  g_smem_limit[kernel] = bytes;
  return cudaSuccess;
}

}  // namespace fusedlm::emu

#ifdef FUSEDLM_EMU_OWN_SWITCH
extern "C" void fusedlm_emu_fiber_start() { fusedlm::emu::fiber_main(); }
#endif

// ---- the runtime API's stand-ins (cuda_runtime_api.h) ---------------------------------------

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
  }
  return "unknown error";
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = fusedlm::emu::g_last_error;
  fusedlm::emu::g_last_error = cudaSuccess;
  return e;
}

// One emulated device, of compute capability 8.0 (the code paths that run are sm_80's).
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrComputeCapabilityMajor ? 8 : 0;
  return cudaSuccess;
}

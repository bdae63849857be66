// The CPU emulator's scheduler and runtime (see emu.h): fibers, one block at a time.
#include "emu.h"

#include "include/cuda.h"
#include "include/cuda_bf16.h"
#include "include/cuda_fp16.h"

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
// The opt-in limit of dynamic shared memory per block: an A100's (the sm_80 code paths), or an
// H100's with FUSEDLM_EMU_ARCH=90.
constexpr int kMaxSmem80 = 166912, kMaxSmem90 = 232448;

enum class Wait { kRunnable, kBlock, kWarp, kMbar, kNamed, kDone };

// A tensor map as the emulator's cuTensorMapEncodeTiled writes it into the CUtensorMap's bytes.
struct TensorMap {
  const unsigned char* base;
  uint32_t magic;
  int8_t rank, elem_bytes;
  int16_t swizzle_bytes;
  uint64_t dim[5], stride[5];  // stride in bytes; stride[0] is the element's size
  uint32_t box[5];
};
static_assert(sizeof(TensorMap) <= sizeof(CUtensorMap), "the map fits the driver's 128 bytes");
constexpr uint32_t kMapMagic = 0x4d61704eu;

// A TMA load in flight: it lands (its box written, its bytes completed on its barrier) at a
// wait on that barrier, or when every thread of the block waits.
struct TmaCopy {
  uint32_t dst, bar;
  TensorMap map;
  int coords[5];
  int line;
};

struct MBar {
  uint32_t count = 0, pending = 0;  // arrivals a phase needs, and still needs
  long long tx = 0;                 // bytes expected and not yet landed
  uint32_t phase = 0;               // phases completed
  std::vector<TmaCopy> copies;
};

// A wgmma product issued by a thread and not yet run: its group's wait runs it.
struct WgOp {
  float* d;
  int n;
  uint64_t a, b;
  bool a_in_regs, scale_d, trans_b, bf16;
  float a_rows[2][16];  // with a_in_regs: this thread's two rows of A (gathered from its quad)
  long group;           // -1 until committed
  int line;
};

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
  uint32_t mbar = 0, parity = 0;  // the mbarrier and phase parity it waits for (Wait::kMbar)
  int named = 0;                  // the named barrier it waits at (Wait::kNamed)
  std::vector<WgOp> wg_ops;       // wgmma products not yet run
  long wg_committed = 0;          // wgmma groups committed so far
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
  std::map<uint32_t, MBar> mbars;  // by shared address
  std::map<int, std::pair<int, int>> named;  // named barrier id -> (threads it needs, arrived)
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
    if (f.wait == Wait::kNamed)
      ++where["named barrier " + std::to_string(f.named) + " at line " + std::to_string(f.line)];
    if (f.wait == Wait::kMbar)
      ++where["an mbarrier wait (shared address " + std::to_string(f.mbar) + ", phase parity " +
              std::to_string(f.parity) + ") at line " + std::to_string(f.line)];
  }
  std::string s;
  for (const auto& [what, n] : where) s += (s.empty() ? "" : "; ") + std::to_string(n) + " thread(s) wait at " + what;
  return s;
}

bool land_all_tma(Block& b);

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
    if (!next && land_all_tma(b)) continue;  // every thread waits: the copies in flight land
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

// ---- Hopper: the shared window, mbarriers, TMA, wgmma ----------------------------------------

int arch() {
  const char* v = std::getenv("FUSEDLM_EMU_ARCH");
  if (!v || !*v || std::string(v) == "80") return 80;
  if (std::string(v) == "90") return 90;
  throw std::runtime_error(std::string("FUSEDLM_EMU_ARCH must be '80' or '90', got '") + v + "'");
}

namespace {

[[noreturn]] void fail(const std::string& what, int line) {
  throw std::runtime_error("fusedlm emulator: " + what + " at line " + std::to_string(line));
}

// The bytes at shared address `addr`, checked to lie in the block's shared memory.
unsigned char* shared_at(uint32_t addr, size_t bytes, const char* what, int line) {
  Block& b = *g_block;
  if (addr < kSharedBase || addr - kSharedBase + bytes > b.smem.size())
    fail(std::string(what) + " outside the block's shared memory (address " + std::to_string(addr) + ", " +
             std::to_string(bytes) + " bytes; the window is [" + std::to_string(kSharedBase) + ", " +
             std::to_string(kSharedBase + b.smem.size()) + "))",
         line);
  return b.smem.data() + (addr - kSharedBase);
}

// The 128-byte swizzle (Swizzle<3,4,3> on byte addresses): the 16-byte chunk within a 128-byte
// row is XORed with the row's position within its 1024-byte group. TMA writes and wgmma reads
// apply the same function to the shared address.
uint32_t swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 7u) << 4); }

MBar& mbar_at(uint32_t bar, int line) {
  Block& b = *g_block;
  if (bar % 8 != 0) fail("an mbarrier at a shared address not 8-byte aligned (" + std::to_string(bar) + ")", line);
  shared_at(bar, 8, "an mbarrier", line);
  const auto it = b.mbars.find(bar);
  if (it == b.mbars.end())
    fail("an mbarrier used before mbarrier.init (shared address " + std::to_string(bar) + ")", line);
  return it->second;
}

// A phase with every arrival and every expected byte completes: the next begins, and the
// threads waiting for it run again. Returns the position in scheduling order of the first of
// them, or -1.
long complete_if_done(uint32_t bar, MBar& m) {
  if (m.pending != 0 || m.tx != 0) return -1;
  ++m.phase;
  m.pending = m.count;
  Block& b = *g_block;
  long first = -1;
  for (size_t k = 0; k < b.order.size(); ++k) {
    Fiber& f = b.fibers[b.order[k]];
    if (f.wait == Wait::kMbar && f.mbar == bar && (m.phase & 1u) != f.parity) {
      f.wait = Wait::kRunnable;
      if (first < 0) first = long(k);
    }
  }
  return first;
}

void land_tma(const TmaCopy& c) {
  Block& b = *g_block;
  const TensorMap& m = c.map;
  uint32_t box = 1;
  for (int i = 0; i < m.rank; ++i) box *= m.box[i];
  const uint32_t row_bytes = m.box[0] * m.elem_bytes, bytes = box * m.elem_bytes;
  shared_at(c.dst, bytes, "a TMA copy's destination", c.line);
  for (const auto& [addr, mb] : b.mbars)
    if (addr + 8 > c.dst && addr < c.dst + bytes)
      fail("a TMA copy overwrites the mbarrier at shared address " + std::to_string(addr), c.line);
  // Box rows (every coordinate but the innermost) one after another, each row_bytes.
  const uint32_t rows = box / m.box[0];
  for (uint32_t r = 0; r < rows; ++r) {
    int64_t at[5] = {0, 0, 0, 0, 0};
    bool inside = true;
    uint32_t rest = r;
    for (int i = 1; i < m.rank; ++i) {
      at[i] = int64_t(c.coords[i]) + rest % m.box[i];
      rest /= m.box[i];
      inside = inside && at[i] >= 0 && uint64_t(at[i]) < m.dim[i];
    }
    int64_t offset = 0;
    for (int i = 1; i < m.rank; ++i) offset += at[i] * int64_t(m.stride[i]);
    for (uint32_t e = 0; e < m.box[0]; ++e) {
      const int64_t x = int64_t(c.coords[0]) + e;
      const uint32_t addr = c.dst + r * row_bytes + e * m.elem_bytes;
      unsigned char* dst = b.smem.data() + (swizzle128(addr) - kSharedBase);
      if (inside && x >= 0 && uint64_t(x) < m.dim[0])
        std::memcpy(dst, m.base + offset + x * m.elem_bytes, m.elem_bytes);
      else
        std::memset(dst, 0, m.elem_bytes);  // out of the tensor: zeros (OOB_FILL_NONE)
    }
  }
  MBar& bar = mbar_at(c.bar, c.line);
  bar.tx -= bytes;  // a box counts its whole size, zero-filled elements included
  complete_if_done(c.bar, bar);
}

// Lands every copy in flight on barrier `bar`.
void land_copies_of(uint32_t bar) {
  std::vector<TmaCopy> copies;
  copies.swap(g_block->mbars[bar].copies);
  for (const TmaCopy& c : copies) land_tma(c);
}

bool land_all_tma(Block& b) {
  bool any = false;
  for (auto& [addr, m] : b.mbars)
    if (!m.copies.empty()) {
      land_copies_of(addr);
      any = true;
    }
  return any;
}

// Element (row, col) of a 16-bit matrix in shared memory under a 128-byte-swizzle descriptor
// (PTX's canonical layouts, in bytes): K-major, rows along M or N and k along the 128-byte row:
// start + (row / 8) SBO + (row % 8) 128 + 2 k. MN-major, 64-element slabs along M or N:
// start + 2 (mn % 64) + (mn / 64) LBO + (k % 8) 128 + (k / 8) SBO.
struct Desc {
  uint32_t start, lbo, sbo;
  bool mn_major, bf16;
  int line;
  float at(int mn, int k) const {
    const uint32_t addr = mn_major ? start + 2 * (mn % 64) + (mn / 64) * lbo + (k % 8) * 128 + (k / 8) * sbo
                                   : start + (mn / 8) * sbo + (mn % 8) * 128 + 2 * k;
    const unsigned char* p = shared_at(swizzle128(addr), 2, "a wgmma operand", line);
    uint16_t bits;
    std::memcpy(&bits, p, 2);
    return bf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
  }
};

Desc decode(uint64_t desc, bool mn_major, bool bf16, int line) {
  if ((desc >> 62) != 1 || ((desc >> 49) & 7u) != 0)
    fail("a wgmma descriptor the emulator does not model (it has the 128-byte swizzle with base offset 0)", line);
  return {uint32_t(desc & 0x3FFF) << 4, uint32_t((desc >> 16) & 0x3FFF) << 4, uint32_t((desc >> 32) & 0x3FFF) << 4,
          mn_major, bf16, line};
}

// Runs one product for the running thread: its accumulators are rows 16 w + l / 4 (+ 8) of the
// warpgroup's 64, columns 8 c + 2 (l % 4) + {0, 1}.
void run_wgmma(const WgOp& op) {
  const Fiber& f = *g_block->running;
  const int w = f.warp % 4, g = f.lane / 4, t = f.lane % 4;
  float a[2][16];
  if (op.a_in_regs) {
    std::memcpy(a, op.a_rows, sizeof a);
  } else {
    const Desc da = decode(op.a, false, op.bf16, op.line);
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k) a[h][k] = da.at(16 * w + g + 8 * h, k);
  }
  const Desc db = decode(op.b, op.trans_b, op.bf16, op.line);
  for (int c = 0; c < op.n / 8; ++c)
    for (int e = 0; e < 2; ++e) {
      const int col = 8 * c + 2 * t + e;
      float bk[16];
      for (int k = 0; k < 16; ++k) bk[k] = db.at(col, k);
      for (int h = 0; h < 2; ++h) {
        float sum = 0.0f;
        for (int k = 0; k < 16; ++k) sum += a[h][k] * bk[k];  // exact products, summed in k order
        float& d = op.d[4 * c + 2 * h + e];
        d = (op.scale_d ? d : 0.0f) + sum;
      }
    }
}

}  // namespace

uint32_t shared_address(const void* p) {
  Block& b = *g_block;
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < b.smem.data() || q > b.smem.data() + b.smem.size())
    throw std::runtime_error("fusedlm emulator: a shared address of a pointer outside shared memory");
  return kSharedBase + static_cast<uint32_t>(q - b.smem.data());
}

void mbar_init(uint32_t bar, uint32_t count, int line) {
  Block& b = *g_block;
  if (bar % 8 != 0) fail("mbarrier.init at a shared address not 8-byte aligned", line);
  shared_at(bar, 8, "an mbarrier", line);
  if (count < 1 || count >= (1u << 20)) fail("mbarrier.init with a count outside [1, 2^20)", line);
  MBar& m = b.mbars[bar];
  m = MBar{};
  m.count = m.pending = count;
}

void mbar_arrive(uint32_t bar, uint32_t expect_bytes, int line) {
  MBar& m = mbar_at(bar, line);
  m.tx += expect_bytes;
  if (m.pending == 0) fail("an mbarrier arrival past its phase's count", line);
  --m.pending;
  // What an arrival releases may happen before the arriving thread's next instruction, as on a
  // GPU: a consumer's "done with this stage" may let the producer refill the stage before the
  // consumer's products have read it. So the threads a completed phase releases run first,
  // and a plain arrival lets the other threads run (and arrive) before this one goes on; an
  // arrival with expected bytes does not (its thread issues those copies next).
  Block& b = *g_block;
  const long released = complete_if_done(bar, m);
  if (released < 0 && expect_bytes > 0) return;
  b.cursor = released >= 0 ? size_t(released) : (b.cursor + 1) % b.order.size();
  yield_until_released();
}

void mbar_wait(uint32_t bar, uint32_t parity, int line) {
  MBar& m = mbar_at(bar, line);
  if ((m.phase & 1u) != parity) return;  // the phase with this parity has completed
  land_copies_of(bar);
  if ((m.phase & 1u) != parity) return;
  Fiber& f = *g_block->running;
  f.wait = Wait::kMbar;
  f.mbar = bar;
  f.parity = parity;
  f.line = line;
  yield_until_released();
}

void tma_load(uint32_t dst, const void* map, const int* coords, int rank, uint32_t bar, int line) {
  TmaCopy c{dst, bar, {}, {}, line};
  std::memcpy(&c.map, map, sizeof c.map);
  if (c.map.magic != kMapMagic) fail("a TMA load with a tensor map cuTensorMapEncodeTiled did not make", line);
  if (c.map.rank != rank) fail("a TMA load whose coordinates do not match its tensor map's rank", line);
  if (c.map.swizzle_bytes == 128 && dst % 1024 != 0)
    fail("a 128-byte-swizzled TMA load into shared memory not aligned to 1024 bytes", line);
  if (dst % 128 != 0) fail("a TMA load into shared memory not aligned to 128 bytes", line);
  std::copy(coords, coords + rank, c.coords);
  mbar_at(bar, line);
  if (g_block->copies_at_issue)
    land_tma(c);
  else
    g_block->mbars[bar].copies.push_back(c);
}

void wgmma(float* d, int n, uint64_t a, const uint32_t* a_regs, uint64_t b, bool scale_d, bool trans_b, bool bf16,
           int line) {
  Block& blk = *g_block;
  Fiber& f = *blk.running;
  if (f.st.block_dim.x * f.st.block_dim.y * f.st.block_dim.z % 128 != 0)
    fail("wgmma in a block that is not whole warpgroups", line);
  WgOp op{d, n, a, b, a_regs != nullptr, scale_d, trans_b, bf16, {}, -1, line};
  if (a_regs) {
    // A's fragments: lane 4g + t holds rows g and g + 8, columns 2t, 2t + 1 (registers 0 and
    // 1) and 2t + 8, 2t + 9 (registers 2 and 3); the register's low half first.
    const unsigned char* slots = collective(a_regs, 16, true, line);
    const int g = f.lane / 4;
    for (int t = 0; t < 4; ++t)
      for (int r = 0; r < 4; ++r) {
        uint32_t v;
        std::memcpy(&v, slots + (4 * g + t) * kSlotBytes + 4 * r, 4);
        for (int e = 0; e < 2; ++e) {
          const uint16_t bits = static_cast<uint16_t>(v >> (16 * e));
          op.a_rows[r % 2][2 * t + 8 * (r / 2) + e] =
              bf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
        }
      }
  }
  f.wg_ops.push_back(op);
}

namespace {

// One arrival at named barrier `id`; true if it completed the barrier (its waiters run again).
bool named_arrival(int id, int threads, int line) {
  Block& b = *g_block;
  if (id < 1 || id > 15 || threads < 32 || threads % 32 != 0 || threads > static_cast<int>(b.fibers.size()))
    fail("a named barrier with id " + std::to_string(id) + " and " + std::to_string(threads) +
             " threads (ids 1..15, whole warps of the block)",
         line);
  auto& [needed, arrived] = b.named[id];
  if (arrived == 0) needed = threads;
  if (needed != threads) fail("named barrier " + std::to_string(id) + " with thread counts that differ", line);
  if (++arrived < needed) return false;
  arrived = 0;
  for (Fiber& o : b.fibers)
    if (o.wait == Wait::kNamed && o.named == id) o.wait = Wait::kRunnable;
  return true;
}

}  // namespace

void named_barrier(int id, int threads, int line) {
  if (named_arrival(id, threads, line)) return;
  Fiber& f = *g_block->running;
  f.wait = Wait::kNamed;
  f.named = id;
  f.line = line;
  yield_until_released();
}

void named_barrier_arrive(int id, int threads, int line) { named_arrival(id, threads, line); }

void wgmma_commit() {
  Fiber& f = *g_block->running;
  for (WgOp& op : f.wg_ops)
    if (op.group < 0) op.group = f.wg_committed;
  ++f.wg_committed;
}

void wgmma_wait(int pending, int line) {
  (void)line;
  Fiber& f = *g_block->running;
  std::vector<WgOp> left;
  for (const WgOp& op : f.wg_ops) {
    if (op.group >= 0 && op.group < f.wg_committed - pending)
      run_wgmma(op);
    else
      left.push_back(op);
  }
  f.wg_ops.swap(left);
}

// The kernels' static __shared__ arrays: emu.h puts them in this section, whose bounds the linker
// marks (weak: a core with none of them has no such section).
extern "C" unsigned char __start_fusedlm_emu_shared[] __attribute__((weak));
extern "C" unsigned char __stop_fusedlm_emu_shared[] __attribute__((weak));

// Fills them with NaN bytes before a block, as its dynamic shared memory, so that a read before
// any write in the block shows (instead of what the previous block left). Byte by byte and not
// sanitized: the address sanitizer may put redzones between the section's variables.
__attribute__((no_sanitize_address)) void poison_static_shared() {
  for (volatile unsigned char* p = __start_fusedlm_emu_shared; p < __stop_fusedlm_emu_shared; ++p) *p = 0xff;
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
          poison_static_shared();
          b.waiting = b.done = 0;
          b.cursor = 0;
          b.error = nullptr;
          b.mbars.clear();
          b.named.clear();
          for (Warp& w : b.warps) w.waiting = w.done = 0;
          for (long long i = 0; i < threads; ++i) {
            Fiber& f = b.fibers[static_cast<size_t>(i)];
            f.warp = static_cast<int>(i / 32);
            f.lane = static_cast<int>(i % 32);
            f.wait = Wait::kRunnable;
            f.copies.clear();  // a copy never waited for never lands
            f.committed = 0;
            f.collectives = 0;
            f.wg_ops.clear();  // a product never waited for never runs
            f.wg_committed = 0;
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
          // Arrivals at a named barrier that no bar.sync completed: a turn-taking protocol
          // that is off by one (the hardware's state for them at the block's end is not a
          // thing to rely on).
          for (const auto& [id, state] : b.named)
            if (state.second != 0)
              throw std::runtime_error("fusedlm emulator: named barrier " + std::to_string(id) + " has " +
                                       std::to_string(state.second) + " of " + std::to_string(state.first) +
                                       " arrivals left when block (" + std::to_string(x) + ", " + std::to_string(y) +
                                       ", " + std::to_string(z) + ") ended");
        }
  } catch (...) {
    g_block = saved;
    throw;
  }
  g_block = saved;
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > (arch() >= 90 ? kMaxSmem90 : kMaxSmem80)) return g_last_error = cudaErrorInvalidValue;
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

// One emulated device, of compute capability 8.0, or 9.0 with FUSEDLM_EMU_ARCH=90 (then the
// Hopper kernels run as well).
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
  *value = attr == cudaDevAttrComputeCapabilityMajor ? fusedlm::emu::arch() / 10 : 0;
  return cudaSuccess;
}

namespace {

// cuTensorMapEncodeTiled's checks (the driver's documented ones for the parameters fusedlm
// uses), then the map in the emulator's form.
CUresult encode_tiled(CUtensorMap* out, CUtensorMapDataType type, cuuint32_t rank, void* address,
                      const cuuint64_t* dim, const cuuint64_t* strides, const cuuint32_t* box,
                      const cuuint32_t* element_strides, CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                      CUtensorMapL2promotion, CUtensorMapFloatOOBfill) {
  using fusedlm::emu::TensorMap;
  if (type != CU_TENSOR_MAP_DATA_TYPE_FLOAT16 && type != CU_TENSOR_MAP_DATA_TYPE_BFLOAT16) return CUDA_ERROR_INVALID_VALUE;
  if (rank < 1 || rank > 5 || interleave != CU_TENSOR_MAP_INTERLEAVE_NONE) return CUDA_ERROR_INVALID_VALUE;
  if (reinterpret_cast<uintptr_t>(address) % 16 != 0) return CUDA_ERROR_INVALID_VALUE;
  TensorMap m{};
  m.magic = fusedlm::emu::kMapMagic;
  m.base = static_cast<const unsigned char*>(address);
  m.rank = int8_t(rank);
  m.elem_bytes = 2;
  m.swizzle_bytes = swizzle == CU_TENSOR_MAP_SWIZZLE_128B ? 128 : swizzle == CU_TENSOR_MAP_SWIZZLE_64B ? 64
                    : swizzle == CU_TENSOR_MAP_SWIZZLE_32B ? 32 : 0;
  for (cuuint32_t i = 0; i < rank; ++i) {
    if (dim[i] == 0 || dim[i] > (1ull << 32) || box[i] == 0 || box[i] > 256) return CUDA_ERROR_INVALID_VALUE;
    if (element_strides[i] != 1) return CUDA_ERROR_INVALID_VALUE;  // the emulator models unit steps only
    if (i > 0 && (strides[i - 1] % 16 != 0 || strides[i - 1] >= (1ull << 40))) return CUDA_ERROR_INVALID_VALUE;
    m.dim[i] = dim[i];
    m.stride[i] = i == 0 ? 2 : strides[i - 1];
    m.box[i] = box[i];
  }
  if (box[0] * 2 % 16 != 0) return CUDA_ERROR_INVALID_VALUE;
  // The emulator models the 128-byte swizzle with 128-byte rows (the driver allows narrower).
  if (m.swizzle_bytes != 128 || box[0] * 2 != 128) return CUDA_ERROR_INVALID_VALUE;
  std::memset(out, 0, sizeof *out);
  std::memcpy(out, &m, sizeof m);
  return CUDA_SUCCESS;
}

}  // namespace

cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned, unsigned long long,
                                             cudaDriverEntryPointQueryResult* status) {
  const bool found = std::string(symbol) == "cuTensorMapEncodeTiled";
  *fn = found ? reinterpret_cast<void*>(&encode_tiled) : nullptr;
  *status = found ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

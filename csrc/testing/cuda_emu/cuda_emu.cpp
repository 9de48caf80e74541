// CUDA execution-model emulator: scheduler, fibers, guarded device memory, fault reporting.
// See cuda_emu.h for the kernel-facing API and README.md for the model and its limits.
#include "cuda_emu.h"

#include <csignal>
#include <cstdarg>
#include <cstdlib>
#include <csetjmp>
#include <cxxabi.h>
#include <deque>
#include <dlfcn.h>
#include <map>
#include <mutex>
#include <sys/mman.h>
#include <sys/time.h>
#include <ucontext.h>
#include <unistd.h>
#include <unordered_map>
#include <vector>

uint3 threadIdx = {0, 0, 0};
uint3 blockIdx = {0, 0, 0};
dim3 blockDim = dim3(1, 1, 1);
dim3 gridDim = dim3(1, 1, 1);

// ---------------------------------------------------------------------------------------------------------
// Context switch. x86-64: a minimal switch of the callee-saved registers, MXCSR and the x87 control word
// (ucontext's swapcontext also saves the signal mask with a system call, ~20x slower). Elsewhere: ucontext.
// ---------------------------------------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void lattice_emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.p2align 4
.globl lattice_emu_switch
.hidden lattice_emu_switch
.type lattice_emu_switch,@function
lattice_emu_switch:
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
.size lattice_emu_switch,.-lattice_emu_switch
)");
#define LATTICE_EMU_ASM_SWITCH 1
#endif

namespace lattice_emu {
namespace {

constexpr size_t kPage = 4096;
constexpr unsigned char kPoison = 0xff;  // fresh device / shared memory: NaN floats, -1 integers
constexpr unsigned char kCanary = 0xfb;  // slack around an allocation inside its guard pages

enum State : int { kReady, kRunning, kAtBarrier, kInWarp, kDone, kFailed };
const char* const kOpNames[kNumWarpOps] = {
    "__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync", "__ballot_sync", "__any_sync",
    "__all_sync", "__uni_sync", "__match_any_sync", "__match_all_sync", "__reduce_add_sync(unsigned)",
    "__reduce_add_sync(int)", "__reduce_min_sync(unsigned)", "__reduce_min_sync(int)", "__reduce_max_sync(unsigned)",
    "__reduce_max_sync(int)", "__reduce_and_sync", "__reduce_or_sync", "__reduce_xor_sync", "__syncwarp",
    "wmma::fill_fragment", "wmma::load_matrix_sync", "wmma::store_matrix_sync", "wmma::mma_sync"};

struct Fiber {
  void* sp = nullptr;
#ifndef LATTICE_EMU_ASM_SWITCH
  ucontext_t uc;
#endif
  char* stack_lo = nullptr;  // usable stack [stack_lo, stack_hi); the page below stack_lo is PROT_NONE
  char* stack_hi = nullptr;
  uint3 tid{0, 0, 0};
  int linear = 0, warp = 0, lane = 0;
  int state = kReady;
  int op = 0, arg = 0, width = 32, pred_out = 0;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int barrier_kind = 0, barrier_pred = 0, barrier_result = 0;
};

struct Alloc {
  char* map_base = nullptr;  // [map_base, map_base + map_len): guard page, slack, data, slack, guard page
  size_t map_len = 0;
  char* data = nullptr;
  size_t size = 0;
  std::string label;
};

struct Options {
  int schedule = 0;  // 0 forward, 1 reverse, 2 random
  uint64_t seed = 0;
  int align = 0;  // 0: data ends at the trailing guard page (16-byte aligned start); 1: starts after the leading one
  double timeout_s = 120.0;
  size_t stack_bytes = 64 * 1024;
};

struct Stats {
  unsigned long long launches = 0, blocks = 0, threads = 0, switches = 0;
};

struct Run {
  bool active = false;
  std::string kernel;
  dim3 grid, block;
  int nthreads = 0;
  Body body = nullptr;
  void* ctx = nullptr;
  std::vector<Fiber> fibers;
  std::deque<int> ready;
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
#ifndef LATTICE_EMU_ASM_SWITCH
  ucontext_t sched_uc;
#endif
  std::string error;
  Alloc shared;  // dynamic shared memory of the current launch
  size_t shared_bytes = 0;
  uint64_t rng = 0;
};

Options g_opt;
Stats g_stats;
Run g_run;
std::map<uintptr_t, Alloc> g_allocs;  // by data address
std::unordered_map<const void*, int> g_max_dynamic_shared;
std::recursive_mutex g_mutex;
// Stack pool for fibers.
char* g_stacks = nullptr;
size_t g_stack_slots = 0, g_stack_slot_bytes = 0;
// Fault handling.
sigjmp_buf g_jmp;
volatile sig_atomic_t g_in_fiber = 0;     // a fiber (kernel code) is running
volatile sig_atomic_t g_in_emu_code = 0;  // ... inside the emulator's own bookkeeping
volatile sig_atomic_t g_timeout_pending = 0;
char g_fault_msg[2048];
struct sigaction g_old_actions[4];
const int g_signals[4] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE};
struct sigaction g_old_vtalrm;
stack_t g_old_altstack;
char* g_altstack = nullptr;
const size_t kAltStackBytes = 256 * 1024;
bool g_options_from_env = false;

uint64_t next_random() {
  uint64_t z = (g_run.rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void load_env_options() {
  if (g_options_from_env) return;
  g_options_from_env = true;
  if (const char* s = std::getenv("LATTICE_EMU_SCHEDULE")) {
    const std::string v(s);
    g_opt.schedule = v == "reverse" ? 1 : v == "random" ? 2 : 0;
  }
  if (const char* s = std::getenv("LATTICE_EMU_SEED")) g_opt.seed = std::strtoull(s, nullptr, 10);
  if (const char* s = std::getenv("LATTICE_EMU_ALIGN")) g_opt.align = std::string(s) == "start" ? 1 : 0;
  if (const char* s = std::getenv("LATTICE_EMU_TIMEOUT_S")) g_opt.timeout_s = std::atof(s);
  if (const char* s = std::getenv("LATTICE_EMU_STACK_KB")) g_opt.stack_bytes = std::strtoull(s, nullptr, 10) * 1024;
}

std::string demangled_kernel_name(const void* kernel) {
  Dl_info info;
  if (dladdr(kernel, &info) == 0 || info.dli_sname == nullptr) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "<kernel at %p>", kernel);
    return buf;
  }
  int status = 0;
  char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string name = (status == 0 && d) ? d : info.dli_sname;
  std::free(d);
  // Drop the return type and the parameter list: "void ns::k<float, 4>(float const*, ...)" -> "ns::k<float, 4>".
  int depth = 0;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    if (c == '<') ++depth;
    if (c == '>') --depth;
    if (c == '(' && depth == 0) {
      name.resize(i);
      break;
    }
  }
  if (name.rfind("void ", 0) == 0) name = name.substr(5);
  return name;
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

std::string lanes_string(unsigned m) {
  std::string s;
  for (int l = 0; l < 32; ++l) {
    if (!(m & (1u << l))) continue;
    int e = l;
    while (e + 1 < 32 && (m & (1u << (e + 1)))) ++e;
    if (!s.empty()) s += ",";
    s += e == l ? std::to_string(l) : std::to_string(l) + "-" + std::to_string(e);
    l = e;
  }
  return s.empty() ? "none" : s;
}

std::string where(const Fiber* f) {
  if (f == nullptr) return fmt("kernel %s", g_run.kernel.c_str());
  return fmt("kernel %s, block (%u,%u,%u), thread (%u,%u,%u) [warp %d lane %d]", g_run.kernel.c_str(), blockIdx.x,
             blockIdx.y, blockIdx.z, f->tid.x, f->tid.y, f->tid.z, f->warp, f->lane);
}

// --- guarded memory --------------------------------------------------------------------------------------
Alloc make_guarded(size_t bytes, const char* label, bool end_aligned) {
  const size_t data_pages = (bytes + kPage - 1) / kPage + 1;  // +1: room to slide the data against a guard
  Alloc a;
  a.map_len = (data_pages + 2) * kPage;
  void* m = mmap(nullptr, a.map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw std::bad_alloc();
  a.map_base = static_cast<char*>(m);
  mprotect(a.map_base, kPage, PROT_NONE);
  char* hi_guard = a.map_base + a.map_len - kPage;
  mprotect(hi_guard, kPage, PROT_NONE);
  a.size = bytes;
  if (end_aligned) {
    a.data = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(hi_guard) - bytes) & ~uintptr_t(15));
  } else {
    a.data = a.map_base + kPage;
  }
  std::memset(a.map_base + kPage, kCanary, a.map_len - 2 * kPage);
  std::memset(a.data, kPoison, bytes);
  a.label = label ? label : "device buffer";
  return a;
}

void release_guarded(Alloc& a) {
  if (a.map_base) munmap(a.map_base, a.map_len);
  a = Alloc();
}

// The first corrupted canary byte around `a`, or nullptr.
const char* corrupted_canary(const Alloc& a) {
  const char* lo = a.map_base + kPage;
  const char* hi = a.map_base + a.map_len - kPage;
  for (const char* p = lo; p < a.data; ++p)
    if (static_cast<unsigned char>(*p) != kCanary) return p;
  for (const char* p = a.data + a.size; p < hi; ++p)
    if (static_cast<unsigned char>(*p) != kCanary) return p;
  return nullptr;
}

const Alloc* find_alloc_containing(uintptr_t addr, bool whole_mapping) {
  auto it = g_allocs.upper_bound(addr + kPage * 4);
  while (it != g_allocs.begin()) {
    --it;
    const Alloc& a = it->second;
    const uintptr_t lo = whole_mapping ? reinterpret_cast<uintptr_t>(a.map_base) : reinterpret_cast<uintptr_t>(a.data);
    const uintptr_t hi = whole_mapping ? lo + a.map_len : lo + a.size;
    if (addr >= lo && addr < hi) return &a;
    if (reinterpret_cast<uintptr_t>(a.map_base) + a.map_len + 4 * kPage < addr) break;
  }
  return nullptr;
}

std::string describe_address(uintptr_t addr) {
  auto relative = [&](const Alloc& a, const char* what) {
    const std::string name = what == std::string("device buffer") ? " '" + a.label + "'" : std::string();
    const uintptr_t lo = reinterpret_cast<uintptr_t>(a.data), hi = lo + a.size;
    if (addr >= hi) {
      return fmt("%zu bytes past the end of %s%s (%zu bytes at %p)", static_cast<size_t>(addr - hi), what,
                 name.c_str(), a.size, a.data);
    }
    if (addr < lo) {
      return fmt("%zu bytes before the start of %s%s (%zu bytes at %p)", static_cast<size_t>(lo - addr), what,
                 name.c_str(), a.size, a.data);
    }
    return fmt("inside %s%s at offset %zu", what, name.c_str(), static_cast<size_t>(addr - lo));
  };
  if (const Alloc* a = find_alloc_containing(addr, true)) return relative(*a, "device buffer");
  const Alloc& s = g_run.shared;
  if (s.map_base && addr >= reinterpret_cast<uintptr_t>(s.map_base) &&
      addr < reinterpret_cast<uintptr_t>(s.map_base) + s.map_len) {
    return relative(s, "dynamic shared memory");
  }
  if (g_stacks && addr >= reinterpret_cast<uintptr_t>(g_stacks) &&
      addr < reinterpret_cast<uintptr_t>(g_stacks) + g_stack_slots * g_stack_slot_bytes) {
    return fmt("the thread's stack guard page: stack overflow (fiber stacks are %zu KiB; raise LATTICE_EMU_STACK_KB)",
               g_opt.stack_bytes / 1024);
  }
  if (addr < kPage * 16) return "a null pointer (plus a small offset)";
  return "an address outside every device allocation (a host pointer, a freed buffer or a wild pointer)";
}

// --- signals ---------------------------------------------------------------------------------------------
void fault_handler(int sig, siginfo_t* info, void* uctx) {
  if (!g_in_fiber || g_in_emu_code) {
    // Not kernel code: hand the signal to whoever had it before (Python's faulthandler, the default action).
    for (int i = 0; i < 4; ++i) {
      if (g_signals[i] == sig) sigaction(sig, &g_old_actions[i], nullptr);
    }
    return;  // the faulting instruction re-executes under the previous handler
  }
  const Fiber* f = g_run.cur;
  std::string what;
  if (sig == SIGSEGV || sig == SIGBUS) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
    const char* rw = "access";
#if defined(__x86_64__)
    const auto* uc = static_cast<const ucontext_t*>(uctx);
    rw = (uc->uc_mcontext.gregs[REG_ERR] & 2) ? "write" : "read";
    if (addr == 0 && sig == SIGSEGV && info->si_code == SI_KERNEL) {
      what = "general protection fault (a misaligned vector access or a non-canonical address)";
    }
#else
    (void)uctx;
#endif
    if (what.empty()) what = fmt("out-of-bounds %s at %p: %s", rw, info->si_addr, describe_address(addr).c_str());
  } else if (sig == SIGILL) {
    what = "trap: out-of-bounds index into a fixed-size array (a __shared__ or local array; -fsanitize=bounds)";
  } else {
    what = "arithmetic exception (integer division by zero?)";
  }
  std::snprintf(g_fault_msg, sizeof g_fault_msg, "%s: %s", where(f).c_str(), what.c_str());
  siglongjmp(g_jmp, 1);
}

void timeout_handler(int, siginfo_t*, void*) {
  if (g_in_fiber && !g_in_emu_code) {
    std::snprintf(g_fault_msg, sizeof g_fault_msg,
                  "%s: kernel ran for more than %.0f s of CPU time without finishing: a thread spinning on a value "
                  "another thread must write (the emulator only switches threads at __syncthreads(), warp collectives "
                  "and __nanosleep()) or an endless loop",
                  where(g_run.cur).c_str(), g_opt.timeout_s);
    siglongjmp(g_jmp, 2);
  }
  g_timeout_pending = 1;
}

void install_handlers() {
  if (!g_altstack) {
    g_altstack = static_cast<char*>(mmap(nullptr, kAltStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                                         -1, 0));
  }
  stack_t ss{};
  ss.ss_sp = g_altstack;
  ss.ss_size = kAltStackBytes;
  sigaltstack(&ss, &g_old_altstack);
  struct sigaction sa {};
  sa.sa_sigaction = fault_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  for (int i = 0; i < 4; ++i) sigaction(g_signals[i], &sa, &g_old_actions[i]);
  struct sigaction ta {};
  ta.sa_sigaction = timeout_handler;
  ta.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&ta.sa_mask);
  sigaction(SIGVTALRM, &ta, &g_old_vtalrm);
  itimerval t{};
  t.it_value.tv_sec = static_cast<time_t>(g_opt.timeout_s);
  t.it_value.tv_usec = static_cast<suseconds_t>((g_opt.timeout_s - static_cast<double>(t.it_value.tv_sec)) * 1e6);
  if (t.it_value.tv_sec == 0 && t.it_value.tv_usec == 0) t.it_value.tv_usec = 1;
  setitimer(ITIMER_VIRTUAL, &t, nullptr);
}

void remove_handlers() {
  itimerval t{};
  setitimer(ITIMER_VIRTUAL, &t, nullptr);
  sigaction(SIGVTALRM, &g_old_vtalrm, nullptr);
  for (int i = 0; i < 4; ++i) sigaction(g_signals[i], &g_old_actions[i], nullptr);
  sigaltstack(&g_old_altstack, nullptr);
}

// --- fibers ----------------------------------------------------------------------------------------------
void ensure_stacks(int n) {
  const size_t slot = g_opt.stack_bytes + kPage;
  if (g_stacks && static_cast<int>(g_stack_slots) >= n && g_stack_slot_bytes == slot) return;
  if (g_stacks) munmap(g_stacks, g_stack_slots * g_stack_slot_bytes);
  g_stack_slots = static_cast<size_t>(std::max(n, 32));
  g_stack_slot_bytes = slot;
  void* m = mmap(nullptr, g_stack_slots * slot, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (m == MAP_FAILED) throw std::bad_alloc();
  g_stacks = static_cast<char*>(m);
  for (size_t i = 0; i < g_stack_slots; ++i) mprotect(g_stacks + i * slot, kPage, PROT_NONE);
}

void to_scheduler(Fiber* f) {
  ++g_stats.switches;
  g_in_fiber = 0;
#ifdef LATTICE_EMU_ASM_SWITCH
  lattice_emu_switch(&f->sp, g_run.sched_sp);
#else
  swapcontext(&f->uc, &g_run.sched_uc);
#endif
  // Resumed by the scheduler, which restored threadIdx and g_run.cur.
}

[[noreturn]] void fail(const std::string& msg) {
  Fiber* f = g_run.cur;
  g_in_emu_code = 1;
  if (g_run.error.empty()) g_run.error = where(f) + ": " + msg;
  f->state = kFailed;
  to_scheduler(f);
  std::abort();  // never resumed
}

void fiber_entry() {
  Fiber* f = g_run.cur;
  g_in_emu_code = 0;
  try {
    g_run.body(g_run.ctx);
  } catch (const std::exception& e) {
    g_in_emu_code = 1;
    g_run.error = where(f) + ": the kernel threw " + e.what();
  } catch (...) {
    g_in_emu_code = 1;
    g_run.error = where(f) + ": the kernel threw an exception";
  }
  g_in_emu_code = 1;
  f->state = g_run.error.empty() ? kDone : kFailed;
  to_scheduler(f);
  std::abort();  // never resumed
}

#ifndef LATTICE_EMU_ASM_SWITCH
void fiber_entry_uc() { fiber_entry(); }
#endif

void init_fiber(Fiber& f, int slot) {
  f.stack_lo = g_stacks + static_cast<size_t>(slot) * g_stack_slot_bytes + kPage;
  f.stack_hi = f.stack_lo + g_opt.stack_bytes;
#ifdef LATTICE_EMU_ASM_SWITCH
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(f.stack_hi) & ~uintptr_t(15));
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  top[-1] = 0;                                            // fiber_entry's (never used) return address
  top[-2] = reinterpret_cast<uint64_t>(&fiber_entry);    // where the first switch "returns" to
  for (int i = 3; i <= 8; ++i) top[-i] = 0;              // rbp rbx r12 r13 r14 r15
  top[-9] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  f.sp = &top[-9];
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack_lo;
  f.uc.uc_stack.ss_size = g_opt.stack_bytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, &fiber_entry_uc, 0);
#endif
}

void resume(Fiber* f) {
  ++g_stats.switches;
  g_run.cur = f;
  threadIdx = f->tid;
  f->state = kRunning;
  g_in_emu_code = 0;
  g_in_fiber = 1;
#ifdef LATTICE_EMU_ASM_SWITCH
  lattice_emu_switch(&g_run.sched_sp, f->sp);
#else
  swapcontext(&g_run.sched_uc, &f->uc);
#endif
  g_in_fiber = 0;
  g_in_emu_code = 1;
}

// Pushes fibers (by linear id, ascending) onto the ready queue in the schedule's order.
void push_ready(std::vector<int>& ids) {
  if (g_opt.schedule == 1) std::reverse(ids.begin(), ids.end());
  for (int id : ids) {
    g_run.fibers[id].state = kReady;
    g_run.ready.push_back(id);
  }
}

int pop_ready() {
  if (g_run.ready.empty()) return -1;
  if (g_opt.schedule == 2) {
    const size_t k = next_random() % g_run.ready.size();
    std::swap(g_run.ready[k], g_run.ready.back());
    const int id = g_run.ready.back();
    g_run.ready.pop_back();
    return id;
  }
  const int id = g_run.ready.front();
  g_run.ready.pop_front();
  return id;
}

unsigned warp_lanes_in_state(int warp, int state) {
  unsigned m = 0;
  for (int l = 0; l < 32; ++l) {
    const int id = warp * 32 + l;
    if (id < g_run.nthreads && g_run.fibers[id].state == state) m |= 1u << l;
  }
  return m;
}

unsigned warp_existing_lanes(int warp) {
  const int n = std::min(32, g_run.nthreads - warp * 32);
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

// All lanes of `mask` in `warp` have arrived with the same op: compute every participant's result.
void complete_collective(int warp, unsigned mask) {
  Fiber* lanes[32] = {};
  for (int l = 0; l < 32; ++l)
    if (mask & (1u << l)) lanes[l] = &g_run.fibers[warp * 32 + l];
  const int op = lanes[__builtin_ctz(mask)]->op;
  auto u32 = [&](int l) { return static_cast<uint32_t>(lanes[l]->value); };
  std::vector<int> woken;
  for (int l = 0; l < 32; ++l) {
    if (!lanes[l]) continue;
    Fiber* f = lanes[l];
    uint64_t r = 0;
    switch (op) {
      case kShflIdx:
      case kShflUp:
      case kShflDown:
      case kShflXor: {
        // PTX shfl.sync semantics, with c = ((32 - width) << 8) | clamp as the CUDA headers build it.
        const unsigned segmask = static_cast<unsigned>(32 - f->width) & 31u;
        const unsigned clamp = op == kShflUp ? 0u : 31u;
        const int max_lane = static_cast<int>((l & segmask) | (clamp & ~segmask));
        const int min_lane = static_cast<int>(l & segmask);
        const int b = f->arg & 31;  // PTX: bval = b[4:0]
        int j = l;
        bool in_range = false;
        if (op == kShflUp) { j = l - b; in_range = j >= max_lane; }
        if (op == kShflDown) { j = l + b; in_range = j <= max_lane; }
        if (op == kShflXor) { j = l ^ b; in_range = j <= max_lane; }
        if (op == kShflIdx) { j = min_lane | (b & static_cast<int>(~segmask & 31u)); in_range = j <= max_lane; }
        if (!in_range) j = l;
        if (j < 0 || j > 31 || !lanes[j]) {
          g_run.cur = f;
          threadIdx = f->tid;
          g_run.error = where(f) + fmt(": %s reads lane %d, which is not in the mask 0x%08x (undefined on a GPU)",
                                       kOpNames[op], j, mask);
          return;
        }
        r = lanes[j]->value;
        break;
      }
      case kBallot:
      case kAny:
      case kAll:
      case kUni: {
        unsigned ballot = 0;
        for (int k = 0; k < 32; ++k)
          if (lanes[k] && lanes[k]->value) ballot |= 1u << k;
        if (op == kBallot) r = ballot;
        if (op == kAny) r = ballot != 0;
        if (op == kAll) r = ballot == mask;
        if (op == kUni) r = ballot == 0 || ballot == mask;
        break;
      }
      case kMatchAny: {
        unsigned m = 0;
        for (int k = 0; k < 32; ++k)
          if (lanes[k] && lanes[k]->value == f->value) m |= 1u << k;
        r = m;
        break;
      }
      case kMatchAll: {
        bool all = true;
        for (int k = 0; k < 32; ++k)
          if (lanes[k] && lanes[k]->value != f->value) all = false;
        r = all ? mask : 0u;
        f->pred_out = all ? 1 : 0;
        break;
      }
      case kWmmaFill:
      case kWmmaLoad:
      case kWmmaStore:
      case kWmmaMma: {
        // Every lane must make the same call: same call site (line in `arg`), pointer, ldm, layout.
        const int l0 = __builtin_ctz(mask);
        if (lanes[l0]->value != f->value || lanes[l0]->arg != f->arg) {
          g_run.cur = f;
          threadIdx = f->tid;
          g_run.error = where(f) + fmt(": divergent %s: lane %d calls it at line %d, lane %d at line %d%s; every lane "
                                       "of the warp must execute the same call with the same pointer, ldm and layout",
                                       kOpNames[op], l0, lanes[l0]->arg, l, f->arg,
                                       lanes[l0]->arg == f->arg ? " with a different pointer, ldm, layout or value" : "");
          return;
        }
        break;
      }
      default: {
        if (op == kSyncWarp) break;
        uint32_t acc = op == kReduceAnd ? 0xffffffffu : 0u;
        bool first = true;
        for (int k = 0; k < 32; ++k) {
          if (!lanes[k]) continue;
          const uint32_t v = u32(k);
          switch (op) {
            case kReduceAddU: case kReduceAddI: acc += v; break;
            case kReduceMinU: acc = first ? v : std::min(acc, v); break;
            case kReduceMaxU: acc = first ? v : std::max(acc, v); break;
            case kReduceMinI: acc = first ? v : static_cast<uint32_t>(std::min(static_cast<int32_t>(acc), static_cast<int32_t>(v))); break;
            case kReduceMaxI: acc = first ? v : static_cast<uint32_t>(std::max(static_cast<int32_t>(acc), static_cast<int32_t>(v))); break;
            case kReduceAnd: acc &= v; break;
            case kReduceOr: acc |= v; break;
            case kReduceXor: acc ^= v; break;
          }
          first = false;
        }
        r = acc;
      }
    }
    f->result = r;
  }
  for (int l = 0; l < 32; ++l)
    if (lanes[l]) woken.push_back(warp * 32 + l);
  push_ready(woken);
}

// No fiber is runnable: release a barrier, finish the block, or report a deadlock.
// Returns false when the block is finished.
bool handle_stall() {
  int at_barrier = 0, in_warp = 0, done = 0;
  const Fiber* first_done = nullptr;
  const Fiber* first_warp = nullptr;
  for (const Fiber& f : g_run.fibers) {
    if (f.state == kAtBarrier) ++at_barrier;
    if (f.state == kInWarp) { ++in_warp; if (!first_warp) first_warp = &f; }
    if (f.state == kDone) { ++done; if (!first_done) first_done = &f; }
  }
  if (done == g_run.nthreads) return false;
  if (in_warp == 0 && at_barrier > 0) {
    if (done > 0) {
      g_run.error = fmt("kernel %s, block (%u,%u,%u): __syncthreads() reached by %d of %d threads; %d exited without "
                        "reaching it (first: thread (%u,%u,%u)). Every thread of the block must reach each barrier.",
                        g_run.kernel.c_str(), blockIdx.x, blockIdx.y, blockIdx.z, at_barrier, g_run.nthreads, done,
                        first_done->tid.x, first_done->tid.y, first_done->tid.z);
      return false;
    }
    int count = 0;
    for (const Fiber& f : g_run.fibers) count += f.barrier_pred;
    std::vector<int> ids(g_run.fibers.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      Fiber& f = g_run.fibers[i];
      f.barrier_result = f.barrier_kind == 1 ? count
                         : f.barrier_kind == 2 ? (count == g_run.nthreads)
                         : f.barrier_kind == 3 ? (count > 0)
                                               : 0;
      ids[i] = static_cast<int>(i);
    }
    push_ready(ids);
    return true;
  }
  // Deadlock inside a warp collective.
  const Fiber& w = *first_warp;
  unsigned arrived = 0;
  std::string elsewhere;
  for (int l = 0; l < 32; ++l) {
    const int id = w.warp * 32 + l;
    if (id >= g_run.nthreads) break;
    const Fiber& o = g_run.fibers[id];
    if (o.state == kInWarp && o.mask == w.mask) arrived |= 1u << l;
    if (o.state == kInWarp && o.mask != w.mask && (w.mask & (1u << l))) {
      elsewhere += fmt(" lane %d waits in %s with mask 0x%08x;", l, kOpNames[o.op], o.mask);
    }
  }
  const unsigned missing = w.mask & ~arrived;
  const unsigned missing_exited = missing & warp_lanes_in_state(w.warp, kDone);
  const unsigned missing_barrier = missing & warp_lanes_in_state(w.warp, kAtBarrier);
  g_run.error = fmt("kernel %s, block (%u,%u,%u), warp %d: deadlock: lanes %s wait in %s with mask 0x%08x, but lanes "
                    "%s never arrive (exited: %s; waiting at __syncthreads(): %s;%s). A *_sync mask must name exactly "
                    "the lanes that execute the call.",
                    g_run.kernel.c_str(), blockIdx.x, blockIdx.y, blockIdx.z, w.warp, lanes_string(arrived).c_str(),
                    kOpNames[w.op], w.mask, lanes_string(missing).c_str(), lanes_string(missing_exited).c_str(),
                    lanes_string(missing_barrier).c_str(), elsewhere.empty() ? " none elsewhere" : elsewhere.c_str());
  return false;
}

void run_block() {
  const int n = g_run.nthreads;
  g_run.ready.clear();
  std::vector<int> ids(n);
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_run.fibers[i];
    f = Fiber();
    f.linear = i;
    f.tid = uint3{static_cast<unsigned>(i) % g_run.block.x, (static_cast<unsigned>(i) / g_run.block.x) % g_run.block.y,
                  static_cast<unsigned>(i) / (g_run.block.x * g_run.block.y)};
    f.warp = i / 32;
    f.lane = i % 32;
    init_fiber(f, i);
    ids[i] = i;
  }
  if (g_run.shared.map_base) std::memset(g_run.shared.data, kPoison, g_run.shared.size);
  push_ready(ids);
  for (;;) {
    if (g_timeout_pending) {
      g_run.error = fmt("kernel %s: ran for more than %.0f s of CPU time", g_run.kernel.c_str(), g_opt.timeout_s);
      return;
    }
    const int id = pop_ready();
    if (id < 0) {
      if (!handle_stall()) return;
      continue;
    }
    resume(&g_run.fibers[id]);
    if (!g_run.error.empty()) return;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Kernel-facing entry points
// ---------------------------------------------------------------------------------------------------------
uint64_t warp_collective(int op, unsigned mask, uint64_t value, int arg, int width, int* pred) {
  if (!g_in_fiber) throw std::logic_error("lattice_emu: a warp collective was called outside a kernel");
  g_in_emu_code = 1;
  Fiber* f = g_run.cur;
  const unsigned bit = 1u << f->lane;
  if (!(mask & bit)) {
    fail(fmt("%s called with mask 0x%08x, which does not name the calling lane %d", kOpNames[op], mask, f->lane));
  }
  if (op <= kShflXor && (width < 1 || width > 32 || (width & (width - 1)) != 0)) {
    fail(fmt("%s called with width %d (must be a power of two in [1, 32])", kOpNames[op], width));
  }
  const unsigned exist = warp_existing_lanes(f->warp);
  if (mask & ~exist) {
    fail(fmt("%s mask 0x%08x names lanes %s, which do not exist (block of %d threads)", kOpNames[op], mask,
             lanes_string(mask & ~exist).c_str(), g_run.nthreads));
  }
  const unsigned exited = warp_lanes_in_state(f->warp, kDone) & mask;
  if (exited) {
    fail(fmt("%s mask 0x%08x names lanes %s, which have already exited", kOpNames[op], mask,
             lanes_string(exited).c_str()));
  }
  // Lanes waiting with the same mask wait in the same call: a different op there means some lane named in the
  // mask skipped a collective. (Overlapping but different masks are fine: sub-warp groups progress
  // independently, and a lane still busy elsewhere joins later; a rendezvous that can never complete is
  // reported as a deadlock.)
  unsigned arrived = bit;
  for (int l = 0; l < 32; ++l) {
    const int id = f->warp * 32 + l;
    if (id >= g_run.nthreads) break;
    const Fiber& o = g_run.fibers[id];
    if (o.state != kInWarp || o.mask != mask) continue;
    if (o.op != op || (op <= kShflXor && o.width != width)) {
      fail(fmt("%s (mask 0x%08x, width %d) while lane %d waits in %s with the same mask (width %d): every lane "
               "named in a mask must execute the same warp collectives in the same order",
               kOpNames[op], mask, width, l, kOpNames[o.op], o.width));
    }
    arrived |= 1u << l;
  }
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->arg = arg;
  f->width = width;
  f->state = kInWarp;
  if ((arrived & mask) == mask) {
    complete_collective(f->warp, mask);
    if (!g_run.error.empty()) {
      f->state = kFailed;
      to_scheduler(f);
      std::abort();
    }
  }
  to_scheduler(f);
  if (pred) *pred = f->pred_out;
  return f->result;
}

int block_barrier(int kind, int predicate) {
  if (!g_in_fiber) throw std::logic_error("lattice_emu: __syncthreads() was called outside a kernel");
  g_in_emu_code = 1;
  Fiber* f = g_run.cur;
  f->state = kAtBarrier;
  f->barrier_kind = kind;
  f->barrier_pred = predicate;
  to_scheduler(f);
  return f->barrier_result;
}

unsigned active_mask() {
  if (!g_in_fiber) return 0;
  const Fiber* f = g_run.cur;
  return warp_existing_lanes(f->warp) & ~warp_lanes_in_state(f->warp, kDone);
}

void yield_thread() {
  if (!g_in_fiber) return;
  g_in_emu_code = 1;
  Fiber* f = g_run.cur;
  f->state = kReady;
  g_run.ready.push_back(f->linear);
  to_scheduler(f);
}

void trap(const char* what) {
  if (!g_in_fiber) throw std::runtime_error(std::string("lattice_emu: ") + what + " outside a kernel");
  fail(std::string("the kernel executed ") + what);
}

void misuse(const std::string& what) {
  if (!g_in_fiber) throw std::runtime_error("lattice_emu: " + what + " outside a kernel");
  fail(what);
}

unsigned lane_id() { return g_run.cur ? static_cast<unsigned>(g_run.cur->lane) : 0u; }

long long clock_ticks() { return static_cast<long long>(g_stats.switches); }

void* dynamic_shared_base() { return g_run.shared.data; }
size_t dynamic_shared_size() { return g_run.shared_bytes; }

// ---------------------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------------------
void* device_malloc(size_t bytes, const char* label) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  load_env_options();
  Alloc a = make_guarded(bytes, label, g_opt.align == 0);
  void* p = a.data;
  g_allocs[reinterpret_cast<uintptr_t>(p)] = std::move(a);
  return p;
}

void device_free(void* ptr) {
  if (!ptr) return;
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  auto it = g_allocs.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == g_allocs.end()) throw std::runtime_error("lattice_emu: device_free of a pointer that is not a live allocation");
  release_guarded(it->second);
  g_allocs.erase(it);
}

void check_device_range(const void* p, size_t bytes, const char* what) {
  if (bytes == 0) return;
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const Alloc* al = find_alloc_containing(a, false);
  if (!al || a + bytes > reinterpret_cast<uintptr_t>(al->data) + al->size) {
    throw std::runtime_error(fmt("lattice_emu: %s: %zu bytes at %p are not inside one device allocation (%s)", what,
                                 bytes, p, al ? describe_address(a + bytes - 1).c_str() : describe_address(a).c_str()));
  }
}

void check_pointer_argument(const void* kernel, int index, const void* p) {
  if (!p) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = g_allocs.upper_bound(a);
  if (it != g_allocs.begin()) {
    --it;
    const Alloc& al = it->second;
    if (a >= reinterpret_cast<uintptr_t>(al.data) && a <= reinterpret_cast<uintptr_t>(al.data) + al.size) return;
  }
  throw std::runtime_error(fmt("lattice_emu: kernel %s: pointer argument #%d (%p) is not device memory: %s",
                               demangled_kernel_name(kernel).c_str(), index, p, describe_address(a).c_str()));
}

// ---------------------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------------------
void run_kernel(const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes, Body body, void* ctx) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  load_env_options();
  if (g_run.active) throw std::runtime_error("lattice_emu: kernel launch from inside a kernel is not supported");
  const std::string name = demangled_kernel_name(kernel);
  const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.y > 65535 ||
      grid.z > 65535 || grid.x > 0x7fffffffu) {
    throw std::runtime_error(fmt("lattice_emu: kernel %s: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)",
                                 name.c_str(), grid.x, grid.y, grid.z, block.x, block.y, block.z));
  }
  auto lim = g_max_dynamic_shared.find(kernel);
  const size_t limit = lim == g_max_dynamic_shared.end() ? 48 * 1024 : static_cast<size_t>(lim->second);
  if (dynamic_shared_bytes > limit) {
    throw std::runtime_error(fmt("lattice_emu: kernel %s: %zu bytes of dynamic shared memory exceed the kernel's limit "
                                 "of %zu (raise it with cudaFuncSetAttribute(kernel, "
                                 "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes))",
                                 name.c_str(), dynamic_shared_bytes, limit));
  }
  ++g_stats.launches;
  g_run.active = true;
  g_run.kernel = name;
  g_run.grid = grid;
  g_run.block = block;
  g_run.nthreads = static_cast<int>(nthreads);
  g_run.body = body;
  g_run.ctx = ctx;
  g_run.error.clear();
  g_run.rng = g_opt.seed * 0x2545f4914f6cdd1dull + 1;
  g_run.fibers.assign(nthreads, Fiber());
  release_guarded(g_run.shared);
  g_run.shared = make_guarded(dynamic_shared_bytes, "dynamic shared memory", g_opt.align == 0);
  g_run.shared_bytes = dynamic_shared_bytes;
  ensure_stacks(static_cast<int>(nthreads));
  gridDim = grid;
  blockDim = block;
  g_timeout_pending = 0;
  g_fault_msg[0] = 0;
  std::string error;

  const unsigned long long nblocks = 1ull * grid.x * grid.y * grid.z;
  install_handlers();
  std::vector<unsigned long long> order;  // block visiting order
  if (g_opt.schedule == 2) {
    order.resize(nblocks);
    for (unsigned long long i = 0; i < nblocks; ++i) order[i] = i;
    for (unsigned long long i = nblocks; i > 1; --i) std::swap(order[i - 1], order[next_random() % i]);
  }
  // volatile: modified between sigsetjmp and a possible siglongjmp.
  volatile unsigned long long b = 0;
  if (sigsetjmp(g_jmp, 1) != 0) {
    g_in_fiber = 0;
    error = g_fault_msg;
  } else {
    try {
      for (b = 0; b < nblocks; ++b) {
        unsigned long long lb = b;
        if (g_opt.schedule == 1) lb = nblocks - 1 - b;
        if (g_opt.schedule == 2) lb = order[b];
        blockIdx = uint3{static_cast<unsigned>(lb % grid.x), static_cast<unsigned>((lb / grid.x) % grid.y),
                         static_cast<unsigned>(lb / (1ull * grid.x * grid.y))};
        ++g_stats.blocks;
        g_stats.threads += nthreads;
        run_block();
        if (!g_run.error.empty()) {
          error = g_run.error;
          break;
        }
      }
    } catch (const std::exception& e) {  // the scheduler's own failure (e.g. out of memory): still clean up
      error = std::string("kernel ") + name + ": emulator failure: " + e.what();
    }
  }
  remove_handlers();
  g_in_fiber = 0;
  g_in_emu_code = 0;
  g_run.cur = nullptr;
  g_run.active = false;
  if (error.empty()) {
    for (const auto& kv : g_allocs) {
      if (const char* p = corrupted_canary(kv.second)) {
        const Alloc& a = kv.second;
        const bool after = p >= a.data + a.size;
        error = fmt("kernel %s wrote %zu bytes %s device buffer '%s' (%zu bytes at %p); the writing thread is unknown "
                    "(the write hit the alignment slack in front of the guard page, found by its canary bytes)",
                    name.c_str(), after ? static_cast<size_t>(p - (a.data + a.size)) : static_cast<size_t>(a.data - p),
                    after ? "past the end of" : "before the start of", a.label.c_str(), a.size, a.data);
        break;
      }
    }
    if (error.empty() && g_run.shared.map_base) {
      if (const char* p = corrupted_canary(g_run.shared)) {
        error = fmt("kernel %s wrote outside its dynamic shared memory (%zu bytes; offset %td)", name.c_str(),
                    g_run.shared.size, p - g_run.shared.data);
      }
    }
  }
  // Re-arm the canaries so one overrun is reported once.
  if (!error.empty()) {
    for (auto& kv : g_allocs) {
      Alloc& a = kv.second;
      std::memset(a.map_base + kPage, kCanary, static_cast<size_t>(a.data - (a.map_base + kPage)));
      std::memset(a.data + a.size, kCanary, static_cast<size_t>(a.map_base + a.map_len - kPage - (a.data + a.size)));
    }
    throw std::runtime_error("lattice_emu: " + error);
  }
}

}  // namespace lattice_emu

// ---------------------------------------------------------------------------------------------------------
// Runtime API subset
// ---------------------------------------------------------------------------------------------------------
namespace {
cudaError_t g_last_error = cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  *ptr = lattice_emu::device_malloc(bytes, "cudaMalloc");
  return cudaSuccess;
}
cudaError_t cudaFree(void* ptr) {
  lattice_emu::device_free(ptr);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice)
    lattice_emu::check_device_range(src, bytes, "cudaMemcpy source");
  if (kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice)
    lattice_emu::check_device_range(dst, bytes, "cudaMemcpy destination");
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}
cudaError_t cudaMemset(void* dst, int value, size_t bytes) {
  lattice_emu::check_device_range(dst, bytes, "cudaMemset destination");
  if (bytes) std::memset(dst, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) { return cudaMemset(dst, value, bytes); }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return g_last_error; }
const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    default: return "unspecified launch failure";
  }
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = 4; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute_impl(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
    std::lock_guard<std::recursive_mutex> lock(lattice_emu::g_mutex);
    lattice_emu::g_max_dynamic_shared[func] = value;
  }
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------------
// C API for the Python test harness (ctypes)
// ---------------------------------------------------------------------------------------------------------
extern "C" {
__attribute__((visibility("default"))) void lattice_emu_configure(int schedule, unsigned long long seed, int align,
                                                                   double timeout_s) {
  std::lock_guard<std::recursive_mutex> lock(lattice_emu::g_mutex);
  lattice_emu::load_env_options();
  lattice_emu::g_opt.schedule = schedule;
  lattice_emu::g_opt.seed = seed;
  lattice_emu::g_opt.align = align;
  if (timeout_s > 0) lattice_emu::g_opt.timeout_s = timeout_s;
}

__attribute__((visibility("default"))) void lattice_emu_stats(unsigned long long* out4) {
  out4[0] = lattice_emu::g_stats.launches;
  out4[1] = lattice_emu::g_stats.blocks;
  out4[2] = lattice_emu::g_stats.threads;
  out4[3] = lattice_emu::g_stats.switches;
}

__attribute__((visibility("default"))) unsigned long long lattice_emu_live_allocations() {
  std::lock_guard<std::recursive_mutex> lock(lattice_emu::g_mutex);
  return lattice_emu::g_allocs.size();
}
}

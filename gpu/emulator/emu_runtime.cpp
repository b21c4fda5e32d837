// The emulator runtime: one fiber per CUDA thread (a hand-written x86-64 context switch;
// ucontext elsewhere), blocks run one after another on the calling OS thread, block
// barriers, warp collectives that check every lane of the mask arrives at the same call,
// deadlock reports, diagnostics, and the C API the Python side loads with ctypes.
#include <dlfcn.h>
#include <signal.h>
#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "emu_internal.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

// Provided by the generated kernel translation unit.
extern "C" const emu::Kernel* emu_module_kernels(int* n);
extern "C" const emu::Site* emu_module_sites(int* n);
extern "C" unsigned char* emu_module_smem();

namespace emu {

namespace {
constexpr size_t kStack = 256 * 1024;
constexpr size_t kMaxDiags = 200;
thread_local Exec* t_exec = nullptr;
bool g_initialized = false;
}  // namespace

Exec& X() { return *t_exec; }

const char* kind_name(int kind) {
  switch (kind) {
    case kShfl: return "shuffle";
    case kVote: return "vote";
    case kSyncwarp: return "__syncwarp";
    case kLdmatrix: return "ldmatrix";
    case kMma: return "mma";
    case kBarrier: return "__syncthreads";
  }
  return "?";
}

// ------------------------------------------------------------------ context switch
// x86-64 System V: save the callee-saved registers on the old stack, switch stacks, pop
// them from the new one. The floating-point control state (MXCSR, x87) is shared: CUDA
// kernels cannot change rounding modes.
#if defined(__x86_64__)
extern "C" void emu_switch(void** save, void* to);
asm(R"(
  .text
  .p2align 4
  .type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
)");
static void fiber_main();
static void* init_stack(char* stack) {
  auto* sp = reinterpret_cast<uint64_t*>(stack + kStack);  // 16-byte aligned top
  *--sp = 0;                                              // fiber_main never returns
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);        // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = 0;                   // rbp rbx r12-r15
  return sp;
}
static inline void switch_to(void** save, void* to) { emu_switch(save, to); }
#else
#include <ucontext.h>
static void fiber_main();
static void* init_stack(char* stack) {
  auto* uc = reinterpret_cast<ucontext_t*>(stack);  // the context lives at the stack's base
  getcontext(uc);
  uc->uc_stack.ss_sp = stack + sizeof(ucontext_t);
  uc->uc_stack.ss_size = kStack - sizeof(ucontext_t);
  uc->uc_link = nullptr;
  makecontext(uc, fiber_main, 0);
  return uc;
}
thread_local ucontext_t t_sched_uc;
static inline void switch_to(void** save, void* to) {
  ucontext_t* self = *save ? static_cast<ucontext_t*>(*save) : &t_sched_uc;
  *save = self;
  swapcontext(self, static_cast<ucontext_t*>(to));
}
#endif

static void yield() {
  Exec& x = X();
  switch_to(&x.cur->sp, x.sched_sp);
}

// ------------------------------------------------------------------ diagnostics
static void vdiag(const char* kind, bool fatal, const char* file, int line, int tid,
                  void* ra, const char* fmt, va_list ap) {
  Exec& x = X();
  for (auto& d : x.diags) {
    if (d.kind == kind && d.line == line && d.file == file) {
      ++d.count;
      d.fatal = d.fatal || fatal;
      return;
    }
  }
  if (x.diags.size() >= kMaxDiags) {
    ++x.dropped;
    return;
  }
  char buf[1024];
  vsnprintf(buf, sizeof buf, fmt, ap);
  for (char* c = buf; *c; ++c)
    if (*c == '\t' || *c == '\n') *c = ' ';
  x.diags.push_back({kind, fatal, file ? file : "", line, 1, x.bidx.x, x.bidx.y, x.bidx.z,
                     tid, ra, buf});
}

void diag(const char* kind, bool fatal, const char* file, int line, int tid, void* ra,
          const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vdiag(kind, fatal, file, line, tid, ra, fmt, ap);
  va_end(ap);
}

void fatal(const char* kind, const char* file, int line, void* ra, const char* fmt, ...) {
  Exec& x = X();
  va_list ap;
  va_start(ap, fmt);
  vdiag(kind, true, file, line, x.cur ? (int)x.cur->tid : -1, ra, fmt, ap);
  va_end(ap);
  x.abort = true;
  for (;;) yield();  // the scheduler never resumes an aborted launch
}

std::string lanes(unsigned mask) {
  std::string out;
  for (int i = 0; i < 32;) {
    if (!(mask >> i & 1)) { ++i; continue; }
    int j = i;
    while (j + 1 < 32 && (mask >> (j + 1) & 1)) ++j;
    if (!out.empty()) out += ",";
    out += std::to_string(i);
    if (j > i) out += "-" + std::to_string(j);
    i = j + 1;
  }
  return out.empty() ? "none" : out;
}

std::string thread_name(unsigned tid) {
  return "thread " + std::to_string(tid) + " (warp " + std::to_string(tid / 32) + " lane " +
         std::to_string(tid % 32) + ")";
}

static std::string where(const Key& k) {
  return std::string(kind_name(k.kind)) + " at " + k.file + ":" + std::to_string(k.line);
}

// ------------------------------------------------------------------ warp collectives
static bool needs_whole_warp(int kind) { return kind == kLdmatrix || kind == kMma; }

static void wake(unsigned arrived, unsigned self_lane, unsigned warp) {
  Exec& x = X();
  for (unsigned l = 0; l < 32; ++l)
    if ((arrived >> l & 1) && l != self_lane) x.fibers[warp * 32 + l].st = St::Ready;
}

// Complete `w.pending[i]` if every non-exited lane of its mask has arrived.
static bool try_complete(Warp& w, size_t i, Complete complete, unsigned self_lane,
                         unsigned warp) {
  Pending& p = w.pending[i];
  unsigned need = p.mask & ~w.exited;
  if ((p.arrived & need) != need) return false;
  Pending done = p;
  w.pending.erase(w.pending.begin() + (long)i);
  complete(done.payload, done.arrived, done.key);
  wake(done.arrived, self_lane, warp);
  return true;
}

// Completion functions by kind, for completions triggered by a lane's exit.
static Complete g_complete[8] = {};

void collective(const Key& key, unsigned mask, void* payload, Complete complete, void* ra) {
  Exec& x = X();
  Fiber& f = cur();
  Warp& w = x.warps[f.warp];
  const unsigned bit = 1u << f.lane;
  g_complete[key.kind] = complete;
  if (!(mask & bit))
    fatal("collective-mask", key.file, key.line, ra,
          "%s: %s calls %s with mask 0x%08x that excludes its own lane",
          where(key).c_str(), thread_name(f.tid).c_str(), kind_name(key.kind), mask);
  if (needs_whole_warp(key.kind) && (mask & w.exited))
    fatal("collective-exited", key.file, key.line, ra,
          "%s needs the whole warp but lanes %s of warp %d have exited", where(key).c_str(),
          lanes(mask & w.exited).c_str(), f.warp);
  size_t i = 0;
  for (; i < w.pending.size(); ++i)
    if (w.pending[i].mask & bit) break;
  if (i < w.pending.size()) {
    Pending& p = w.pending[i];
    if (!(p.key == key) || p.mask != mask)
      fatal("collective-mismatch", key.file, key.line, ra,
            "lane %d of warp %d reaches %s (mask 0x%08x) while lanes %s wait at %s "
            "(mask 0x%08x): lanes of a mask must execute the same collective",
            f.lane, f.warp, where(key).c_str(), mask, lanes(p.arrived).c_str(),
            where(p.key).c_str(), p.mask);
  } else {
    for (auto& q : w.pending)
      if (q.mask & mask)
        fatal("collective-mismatch", key.file, key.line, ra,
              "lane %d of warp %d reaches %s with mask 0x%08x overlapping lanes %s waiting "
              "at %s with mask 0x%08x",
              f.lane, f.warp, where(key).c_str(), mask, lanes(q.arrived).c_str(),
              where(q.key).c_str(), q.mask);
    w.pending.push_back(Pending{key, mask, 0, {}});
  }
  w.pending[i].arrived |= bit;
  w.pending[i].payload[f.lane] = payload;
  if (try_complete(w, i, complete, f.lane, f.warp)) return;
  f.st = St::Warp;
  f.wait = key;
  f.ra = ra;
  yield();
}

// ------------------------------------------------------------------ block barrier
static void release_barrier(const Fiber& last) {
  Exec& x = X();
  const Key& k = last.wait;
  std::string others;
  unsigned n_other = 0;
  for (auto& f : x.fibers)
    if (f.st == St::Barrier && !(f.wait == k)) {
      if (n_other++ < 4) others += " " + thread_name(f.tid) + " at line " +
                                   std::to_string(f.wait.line) + ";";
    }
  if (n_other)
    diag("barrier-mismatch", false, k.file, k.line, (int)last.tid, last.ra,
         "__syncthreads reached at different places: %s at %s:%d, but%s (%u threads)",
         thread_name(last.tid).c_str(), k.file, k.line, others.c_str(), n_other);
  if (x.exited)
    diag("barrier-after-exit", false, k.file, k.line, (int)last.tid, last.ra,
         "%u of %u threads exited before the __syncthreads at %s:%d that the others reach "
         "(undefined in CUDA: __syncthreads in conditional code)",
         x.exited, x.nthreads, k.file, k.line);
  ++x.epoch;
  x.at_barrier = 0;
  for (auto& f : x.fibers)
    if (f.st == St::Barrier) f.st = St::Ready;
}

void syncthreads(const Where& wh) {
  void* ra = __builtin_return_address(0);
  Exec& x = X();
  Fiber& f = cur();
  f.wait = Key{kBarrier, wh.file_name(), (int)wh.line(), (int)wh.column(), -1};
  f.ra = ra;
  if (++x.at_barrier + x.exited == x.nthreads) {
    release_barrier(f);
    return;
  }
  f.st = St::Barrier;
  yield();
}

// ------------------------------------------------------------------ thread exit
static void on_exit(Fiber& f) {
  Exec& x = X();
  thread_exit_copies(f);
  Warp& w = x.warps[f.warp];
  w.exited |= 1u << f.lane;
  ++x.exited;
  for (size_t i = 0; i < w.pending.size(); ++i) {
    Pending& p = w.pending[i];
    if (!(p.mask >> f.lane & 1)) continue;
    if (needs_whole_warp(p.key.kind))
      fatal("collective-exited", p.key.file, p.key.line, f.ra,
            "lane %d of warp %d exits while lanes %s wait at %s, which needs the whole "
            "warp",
            f.lane, f.warp, lanes(p.arrived).c_str(), where(p.key).c_str());
    if (try_complete(w, i, g_complete[p.key.kind], 99, f.warp)) --i;
  }
  if (x.at_barrier && x.at_barrier + x.exited == x.nthreads) {
    for (auto& g : x.fibers)
      if (g.st == St::Barrier) {
        release_barrier(g);  // `g` names the barrier's place in the report
        break;
      }
  }
}

static void fiber_main() {
  Exec& x = X();
  x.kernel->thunk(x.params);
  Fiber& f = cur();
  on_exit(f);
  f.st = St::Exited;
  for (;;) yield();
}

// ------------------------------------------------------------------ scheduler
static void deadlock() {
  Exec& x = X();
  std::string msg;
  const Fiber* any = nullptr;
  unsigned at_bar = 0;
  for (auto& f : x.fibers)
    if (f.st == St::Barrier) {
      if (!at_bar++) msg += "__syncthreads at line " + std::to_string(f.wait.line) + ": ";
      any = any ? any : &f;
    }
  if (at_bar) msg += std::to_string(at_bar) + " threads waiting; ";
  for (unsigned wi = 0; wi < x.nwarps; ++wi)
    for (auto& p : x.warps[wi].pending) {
      unsigned missing = p.mask & ~p.arrived & ~x.warps[wi].exited;
      msg += "warp " + std::to_string(wi) + ": lanes " + lanes(p.arrived) + " wait at " +
             where(p.key) + ", lanes " + lanes(missing) + " never arrive";
      for (unsigned l = 0; l < 32; ++l)
        if (missing >> l & 1) {
          const Fiber& g = x.fibers[wi * 32 + l];
          msg += " (lane " + std::to_string(l) + " is at " + where(g.wait) + ")";
          break;
        }
      msg += "; ";
      any = any ? any : &x.fibers[wi * 32 + __builtin_ctz(p.arrived)];
    }
  diag("deadlock", true, any ? any->wait.file : "", any ? any->wait.line : 0,
       any ? (int)any->tid : -1, any ? any->ra : nullptr, "no thread can proceed: %s",
       msg.c_str());
  x.abort = true;
}

static void run_block(Exec& x) {
  for (unsigned t = 0; t < x.nthreads; ++t) {
    Fiber& f = x.fibers[t];
    f.st = St::Ready;
    f.sp = init_stack(f.stack);
    f.copies.clear();
    f.next_group = 0;
    f.wait = Key{};
    f.ra = nullptr;
  }
  for (unsigned wi = 0; wi < x.nwarps; ++wi) {
    Warp& w = x.warps[wi];
    unsigned live = std::min(32u, x.nthreads - wi * 32);
    w.exited = live == 32 ? 0u : ~((1u << live) - 1);
    w.epoch = 1;
    w.pending.clear();
  }
  x.epoch = 1;
  x.at_barrier = x.exited = 0;
  reset_shadow();
  std::memset(x.smem, 0xff, x.smem_bytes);  // never-written shared memory reads as NaN
  for (;;) {
    bool ran = false;
    for (auto& f : x.fibers) {
      if (x.abort) return;
      if (f.st != St::Ready) continue;
      ran = true;
      x.cur = &f;
      threadIdx = f.idx;
      switch_to(&x.sched_sp, f.sp);
      x.cur = nullptr;
    }
    if (x.abort || x.exited == x.nthreads) return;
    if (!ran) return deadlock();
  }
}

static std::vector<char*>& stacks() {
  static thread_local std::vector<char*> s;
  return s;
}

static char* stack_for(unsigned i) {
  auto& s = stacks();
  while (s.size() <= i) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    void* p = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    mprotect(p, page, PROT_NONE);  // guard page below the stack
    s.push_back(static_cast<char*>(p) + page);
  }
  return s[i];
}

// A memory fault inside a kernel (a guard page after a device array, a fiber's stack
// guard) becomes a fatal diagnostic; the faulting fiber is abandoned.
static std::string describe(uintptr_t a) {
  const Exec& x = X();
  std::string best;
  uintptr_t gap = ~(uintptr_t)0;
  for (size_t i = 0; i < x.buffers.size(); ++i) {
    auto [lo, hi] = x.buffers[i];
    if (a >= hi && a - hi < gap) {
      gap = a - hi;
      best = std::to_string(a - hi) + " bytes past the end of device buffer " +
             std::to_string(i) + " (" + std::to_string(hi - lo) + " bytes)";
    } else if (a < lo && lo - a < gap) {
      gap = lo - a;
      best = std::to_string(lo - a) + " bytes before device buffer " + std::to_string(i);
    }
  }
  for (auto& f : x.fibers)
    if (a < (uintptr_t)f.stack && (uintptr_t)f.stack - a <= 4096)
      best = "the guard page of " + thread_name(f.tid) + "'s stack (stack overflow)";
  return best.empty() ? "no device buffer nearby" : best;
}

static void on_fault(int sig, siginfo_t* si, void* ctx) {
  Exec* x = t_exec;
  if (!x || !x->cur) {  // not in a kernel: let the default action happen
    signal(sig, SIG_DFL);
    return;
  }
  void* pc = nullptr;
#if defined(__x86_64__)
  pc = (void*)(static_cast<ucontext_t*>(ctx)->uc_mcontext.gregs[REG_RIP] + 1);
#else
  (void)ctx;
#endif
  uintptr_t a = (uintptr_t)si->si_addr;
  diag("memory-fault", true, "", 0, (int)x->cur->tid, pc,
       "%s by %s at address 0x%lx: %s", sig == SIGSEGV ? "segmentation fault" : "bus error",
       thread_name(x->cur->tid).c_str(), (unsigned long)a, describe(a).c_str());
  x->abort = true;
  switch_to(&x->cur->sp, x->sched_sp);  // never resumed
}

struct FaultGuard {
  struct sigaction old_segv {}, old_bus {};
  stack_t old_stack {};
  FaultGuard() {
    static thread_local std::vector<char> alt(1 << 16);
    stack_t st{};
    st.ss_sp = alt.data();
    st.ss_size = alt.size();
    sigaltstack(&st, &old_stack);
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
  }
  ~FaultGuard() {
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    sigaltstack(&old_stack, nullptr);
  }
};

}  // namespace emu

using namespace emu;

static thread_local Exec* t_last = nullptr;
static std::string g_error;

EXPORT const char* emu_init() {
  if (g_initialized) return nullptr;
  int n = 0;
  const Site* sites = emu_module_sites(&n);
  if (const char* err = parse_sites(sites, n)) {
    g_error = err;
    return g_error.c_str();
  }
  g_initialized = true;
  return nullptr;
}

EXPORT int emu_nkernels() {
  int n = 0;
  emu_module_kernels(&n);
  return n;
}

EXPORT const char* emu_kernel_name(int i) {
  int n = 0;
  return emu_module_kernels(&n)[i].name;
}

EXPORT const char* emu_kernel_signature(int i) {
  int n = 0;
  return emu_module_kernels(&n)[i].signature();
}

EXPORT unsigned emu_smem_capacity() { return EMU_SMEM_CAPACITY; }

// Run kernel `k` on the grid; 0: finished, 1: stopped by a fatal diagnostic, -1: refused.
EXPORT int emu_launch(int k, const unsigned* grid, const unsigned* block,
                      unsigned smem_bytes, void** params, int nbuf, const uint64_t* lo,
                      const uint64_t* hi) {
  int nk = 0;
  const Kernel* kernels = emu_module_kernels(&nk);
  if (!g_initialized || k < 0 || k >= nk || smem_bytes > EMU_SMEM_CAPACITY) return -1;
  delete t_last;
  t_last = new Exec();
  Exec& x = *t_last;
  t_exec = &x;
  x.kernel = &kernels[k];
  x.params = params;
  x.grid = dim3(grid[0], grid[1], grid[2]);
  x.block = dim3(block[0], block[1], block[2]);
  x.nthreads = block[0] * block[1] * block[2];
  if (x.nthreads == 0 || x.nthreads > 1024) return -1;
  x.nwarps = (x.nthreads + 31) / 32;
  x.smem_bytes = smem_bytes;
  x.smem = emu_module_smem();
  for (int i = 0; i < nbuf; ++i) x.buffers.emplace_back(lo[i], hi[i]);
  x.fibers.resize(x.nthreads);
  x.warps.resize(x.nwarps);
  x.shadow.resize(smem_bytes);
  for (unsigned t = 0; t < x.nthreads; ++t) {
    Fiber& f = x.fibers[t];
    f.tid = t;
    f.idx = uint3{t % block[0], (t / block[0]) % block[1], t / (block[0] * block[1])};
    f.warp = (int)(t / 32);
    f.lane = (int)(t % 32);
    f.stack = stack_for(t);
    if (!f.stack) return -1;
  }
  blockDim = x.block;
  gridDim = x.grid;
  FaultGuard guard;
  for (unsigned bz = 0; bz < grid[2] && !x.abort; ++bz)
    for (unsigned by = 0; by < grid[1] && !x.abort; ++by)
      for (unsigned bx = 0; bx < grid[0] && !x.abort; ++bx) {
        x.bidx = uint3{bx, by, bz};
        blockIdx = x.bidx;
        run_block(x);
      }
  t_exec = nullptr;
  return x.abort ? 1 : 0;
}

// The last launch's diagnostics, one per line: kind, fatal, file, line, count, block,
// thread, return-address offset in this library, message (tab-separated). Returns the
// length needed (including the final NUL).
EXPORT long emu_diagnostics(char* buf, long size) {
  std::string out;
  if (t_last) {
    Dl_info info{};
    for (auto& d : t_last->diags) {
      unsigned long off = 0;
      if (d.ra && dladdr(d.ra, &info) && info.dli_fbase)
        off = (unsigned long)((char*)d.ra - (char*)info.dli_fbase);
      char head[512];
      snprintf(head, sizeof head, "%s\t%d\t%s\t%d\t%ld\t%u,%u,%u\t%d\t%lx\t",
               d.kind.c_str(), (int)d.fatal, d.file.c_str(), d.line, d.count, d.bx, d.by,
               d.bz, d.tid, off);
      out += head + d.msg + "\n";
    }
    if (t_last->dropped) out += "dropped\t0\t\t0\t" + std::to_string(t_last->dropped) +
                                "\t0,0,0\t-1\t0\tmore diagnostics than kept\n";
  }
  if (buf && size > 0) {
    size_t n = std::min(out.size(), (size_t)size - 1);
    std::memcpy(buf, out.data(), n);
    buf[n] = 0;
  }
  return (long)out.size() + 1;
}

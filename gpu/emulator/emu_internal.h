// Internals shared by the emulator runtime (emu_runtime.cpp: fibers, scheduler, barriers,
// warp collectives, diagnostics, launch) and the PTX executor (emu_ptx.cpp: PTX parsing,
// cp.async, ldmatrix, mma, the shared-memory shadow).
#pragma once
#include <cstdarg>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda_emu.h"

namespace emu {

enum class St : uint8_t { Ready, Barrier, Warp, Exited };

// What a waiting thread waits at: a collective kind and the call site.
struct Key {
  int kind = 0;  // see CollKind
  const char* file = "";
  int line = 0;
  int col = 0;
  int site = -1;  // PTX site for ldmatrix / mma
  bool operator==(const Key& o) const {
    return kind == o.kind && line == o.line && col == o.col && site == o.site &&
           (file == o.file || std::string(file) == o.file);
  }
};
enum CollKind { kShfl = 1, kVote, kSyncwarp, kLdmatrix, kMma, kBarrier };
const char* kind_name(int kind);

// A cp.async in flight: bytes to land in shared memory at the issuer's wait_group.
struct Copy {
  uint32_t dst;
  uint8_t n;  // cp-size
  int group;  // -1 until committed
  int line;
  const char* file;
  uint8_t data[16];
};

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;
  unsigned tid = 0;
  uint3 idx{};
  int warp = 0, lane = 0;
  St st = St::Ready;
  Key wait;
  void* ra = nullptr;  // return address of the runtime call it waits in
  std::vector<Copy> copies;
  int next_group = 0;
};

// Warp collective: lanes arrive with a payload; the last arriving lane runs `complete`.
using Complete = void (*)(void** payload, unsigned arrived, const Key& key);
struct Pending {
  Key key;
  unsigned mask = 0, arrived = 0;
  void* payload[32] = {};
};

struct Warp {
  unsigned exited = 0;  // lanes that returned, or do not exist (partial last warp)
  uint32_t epoch = 1;   // __syncwarp count
  std::vector<Pending> pending;
};

// Shadow state of one byte of dynamic shared memory.
struct Shadow {
  uint32_t w_epoch, w_wepoch;  // block / writer's warp epoch of the last write (0: none)
  uint32_t r_epoch, r_wepoch;  // block epoch of the recorded reads, max reader warp epoch
  uint16_t writer, reader;     // thread ids (one reader; kMultiReader when several)
  uint16_t w_line, r_line;
  uint8_t flags;
  uint8_t reader_warp;  // 0xff: readers in several warps
};
enum : uint8_t { kPending = 1, kMultiReader = 2 };

struct Diag {
  std::string kind;
  bool fatal;
  std::string file;
  int line;
  long count;
  unsigned bx, by, bz;
  int tid;
  void* ra;
  std::string msg;
};

// Everything about the launch running on this OS thread.
struct Exec {
  // launch
  const Kernel* kernel = nullptr;
  void** params = nullptr;
  dim3 grid, block;
  unsigned nthreads = 0, nwarps = 0;
  uint32_t smem_bytes = 0;
  unsigned char* smem = nullptr;
  std::vector<std::pair<uintptr_t, uintptr_t>> buffers;  // global [lo, hi)
  // block
  uint3 bidx{};
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<Shadow> shadow;
  uint32_t epoch = 1;
  unsigned at_barrier = 0, exited = 0;
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
  bool abort = false;
  // results
  std::vector<Diag> diags;
  long dropped = 0;
};

Exec& X();
inline Fiber& cur() { return *X().cur; }

void diag(const char* kind, bool fatal, const char* file, int line, int tid, void* ra,
          const char* fmt, ...) __attribute__((format(printf, 7, 8)));
// Fatal diagnostic on the current fiber: the launch stops; never returns.
[[noreturn]] void fatal(const char* kind, const char* file, int line, void* ra,
                        const char* fmt, ...) __attribute__((format(printf, 5, 6)));
void collective(const Key& key, unsigned mask, void* payload, Complete complete, void* ra);
std::string lanes(unsigned mask);
std::string thread_name(unsigned tid);

// Shared-memory access checks (emu_shadow.cpp); `what` names the instruction.
bool smem_range(uint32_t addr, uint32_t n, unsigned tid, const Key& at, void* ra,
                const char* what);
void smem_read(uint32_t addr, uint32_t n, unsigned tid, const Key& at, void* ra,
               const char* what, void* out);
void smem_write_begin(uint32_t addr, uint32_t n, unsigned tid, const Key& at, void* ra);
void wait_groups(Fiber& f, int keep);  // land the cp.async groups but the `keep` newest
void thread_exit_copies(Fiber& f);
void reset_shadow();
const char* parse_sites(const Site* sites, int n);  // nullptr or an error message (emu_ptx)

}  // namespace emu

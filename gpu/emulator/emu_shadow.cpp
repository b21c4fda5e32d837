// The shadow of dynamic shared memory: for every byte, its last writer (thread, block
// barrier epoch, warp epoch, line), its readers since the last barrier and whether a
// cp.async to it is in flight. Reports read-after-write, write-after-read and
// write-after-write races between barriers (__syncwarp orders the lanes of one warp),
// reads of never-written bytes, accesses to bytes with a cp.async in flight and accesses
// past the launch's shared size. cp.async data lands at the issuer's wait_group.
#include <algorithm>
#include <cstdio>

#include "emu_internal.h"

namespace emu {

// Whether an access by `prev` (at those epochs) happens before the current one by `tid`.
static bool ordered(unsigned prev, uint32_t prev_epoch, uint32_t prev_wepoch,
                    unsigned tid) {
  Exec& x = X();
  return prev == tid || prev_epoch < x.epoch ||
         (prev / 32 == tid / 32 && prev_wepoch < x.warps[tid / 32].epoch);
}

void reset_shadow() {
  Exec& x = X();
  std::memset(x.shadow.data(), 0, x.shadow.size() * sizeof(Shadow));
}

bool smem_range(uint32_t addr, uint32_t n, unsigned tid, const Key& at, void* ra,
                const char* what) {
  Exec& x = X();
  if ((uint64_t)addr + n <= x.smem_bytes) return true;
  diag("shared-out-of-bounds", false, at.file, at.line, (int)tid, ra,
       "%s by %s accesses shared bytes [%u, %u) past the launch's %u bytes of dynamic "
       "shared memory", what, thread_name(tid).c_str(), addr, addr + n, x.smem_bytes);
  return false;
}

void smem_read(uint32_t addr, uint32_t n, unsigned tid, const Key& at, void* ra,
               const char* what, void* out) {
  Exec& x = X();
  if (!smem_range(addr, n, tid, at, ra, what)) {
    std::memset(out, 0xff, n);
    return;
  }
  const unsigned warp = tid / 32;
  bool pending = false, uninit = false, race = false;
  unsigned other = 0, other_line = 0;
  for (uint32_t i = addr; i < addr + n; ++i) {
    Shadow& s = x.shadow[i];
    if (s.flags & kPending) {
      pending = true;
      other = s.writer;
      other_line = s.w_line;
    } else if (!s.w_epoch) {
      uninit = true;
    } else if (!ordered(s.writer, s.w_epoch, s.w_wepoch, tid)) {
      race = true;
      other = s.writer;
      other_line = s.w_line;
    }
    if (s.r_epoch != x.epoch) {
      s.r_epoch = x.epoch;
      s.reader = (uint16_t)tid;
      s.reader_warp = (uint8_t)warp;
      s.r_wepoch = x.warps[warp].epoch;
      s.r_line = (uint16_t)at.line;
      s.flags &= (uint8_t)~kMultiReader;
    } else {
      if (s.reader != tid) s.flags |= kMultiReader;
      if (s.reader_warp != warp) s.reader_warp = 0xff;
      s.r_wepoch = std::max(s.r_wepoch, x.warps[warp].epoch);
    }
  }
  std::memcpy(out, x.smem + addr, n);
  if (pending)
    diag("pending-read", false, at.file, at.line, (int)tid, ra,
         "%s by %s reads shared bytes [%u, %u) while a cp.async of %s (line %u) to them is "
         "in flight (not waited for with cp.async.wait_group by its issuer)",
         what, thread_name(tid).c_str(), addr, addr + n, thread_name(other).c_str(),
         other_line);
  if (uninit)
    diag("uninitialized-read", false, at.file, at.line, (int)tid, ra,
         "%s by %s reads shared bytes in [%u, %u) that nothing wrote", what,
         thread_name(tid).c_str(), addr, addr + n);
  if (race)
    diag("race-raw", false, at.file, at.line, (int)tid, ra,
         "%s by %s reads shared bytes [%u, %u) written by %s (line %u) with no barrier "
         "between (read-after-write race)",
         what, thread_name(tid).c_str(), addr, addr + n, thread_name(other).c_str(),
         other_line);
}

// Checks before `tid` writes [addr, addr + n) (a cp.async issue); marks the bytes pending.
void smem_write_begin(uint32_t addr, uint32_t n, unsigned tid, const Key& at,
                             void* ra) {
  Exec& x = X();
  const unsigned warp = tid / 32;
  int kind = 0;  // 1 in flight, 2 WAW, 3 WAR
  unsigned other = 0, other_line = 0;
  for (uint32_t i = addr; i < addr + n; ++i) {
    Shadow& s = x.shadow[i];
    if (s.flags & kPending) {
      kind = 1, other = s.writer, other_line = s.w_line;
    } else if (s.w_epoch && !ordered(s.writer, s.w_epoch, s.w_wepoch, tid)) {
      kind = kind ? kind : 2, other = s.writer, other_line = s.w_line;
    } else if (s.r_epoch == x.epoch && ((s.flags & kMultiReader) || s.reader != tid) &&
               !(s.reader_warp == warp && s.r_wepoch < x.warps[warp].epoch)) {
      kind = kind ? kind : 3, other = s.reader, other_line = s.r_line;
    }
    s.flags |= kPending;
    s.writer = (uint16_t)tid;
    s.w_line = (uint16_t)at.line;
  }
  static const char* kinds[] = {"", "pending-write", "race-waw", "race-war"};
  static const char* what[] = {"", "while an earlier cp.async to them is in flight",
                               "also written by", "read by"};
  if (kind == 1)
    diag(kinds[1], false, at.file, at.line, (int)tid, ra,
         "cp.async by %s writes shared bytes [%u, %u) %s (by %s, line %u)",
         thread_name(tid).c_str(), addr, addr + n, what[1], thread_name(other).c_str(),
         other_line);
  else if (kind)
    diag(kinds[kind], false, at.file, at.line, (int)tid, ra,
         "cp.async by %s writes shared bytes [%u, %u) %s %s (line %u) with no barrier "
         "between", thread_name(tid).c_str(), addr, addr + n, what[kind],
         thread_name(other).c_str(), other_line);
}

static void land(Fiber& f, const Copy& c) {
  Exec& x = X();
  std::memcpy(x.smem + c.dst, c.data, c.n);
  for (uint32_t i = c.dst; i < c.dst + c.n; ++i) {
    Shadow& s = x.shadow[i];
    s.flags &= (uint8_t)~(kPending | kMultiReader);
    s.w_epoch = x.epoch;
    s.w_wepoch = x.warps[f.warp].epoch;
    s.writer = (uint16_t)f.tid;
    s.w_line = (uint16_t)c.line;
    s.r_epoch = 0;
  }
}

void wait_groups(Fiber& f, int keep) {
  std::vector<Copy> left;
  for (auto& c : f.copies) {
    if (c.group >= 0 && c.group < f.next_group - keep) land(f, c);
    else left.push_back(c);
  }
  f.copies.swap(left);
}

void thread_exit_copies(Fiber& f) {
  if (f.copies.empty()) return;
  uint32_t bytes = 0;
  for (auto& c : f.copies) bytes += c.n;
  const Copy& c = f.copies.front();
  diag("cp-async-outstanding", false, c.file, c.line, (int)f.tid, f.ra,
       "%s exits with %zu cp.async (%u bytes, issued at line %d) not waited for: they may "
       "land in shared memory after the block has ended", thread_name(f.tid).c_str(),
       f.copies.size(), bytes, c.line);
  f.copies.clear();
}

}  // namespace emu

// The instructions: inline PTX parsed from the kernel's own asm strings and executed with
// the PTX ISA's semantics (cp.async ca/cg with src-size, commit_group / wait_group /
// wait_all, ldmatrix m8n8 x1/x2/x4 with and without .trans, mma.sync m16n8k16 f32 <-
// f16/bf16, ex2.approx), the warp intrinsics (shuffles, votes, __syncwarp), and the
// shadow of every shared-memory byte that reports races, uninitialized reads, accesses
// to bytes with a cp.async in flight and accesses past the launch's shared size.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "emu_internal.h"

namespace emu {

namespace {

enum Op { kCpAsync, kCommit, kWaitGroup, kWaitAll, kLdm, kMmaOp, kEx2 };
enum Dtype { kF16, kBF16 };

struct Ref {  // a PTX operand: %N (with an immediate offset inside [...]) or a literal
  int reg = -1;
  long long imm = 0;
};

struct Instr {
  Op op;
  std::string text;
  int line = 0;
  const char* file = "";
  bool cg = false, trans = false, ftz = false;
  int nmat = 0, cp_size = 0;
  Dtype ab = kF16;
  std::vector<int> d, a, b, c;  // register operands
  Ref addr, src, size, count;   // [addr] ; [src] ; src-size ; wait count
  bool has_size = false;
};

std::vector<std::vector<Instr>> g_sites;
std::vector<std::string> g_cons;  // per site: constraint letters with direction prefixes
std::vector<int> g_nops;          // per site: number of asm operands

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\n"), e = s.find_last_not_of(" \t\n");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

std::vector<std::string> split_top(const std::string& s, char sep) {
  std::vector<std::string> out;
  int depth = 0;
  std::string curs;
  for (char ch : s) {
    if (ch == '{' || ch == '[') ++depth;
    if (ch == '}' || ch == ']') --depth;
    if (ch == sep && depth == 0) {
      out.push_back(trim(curs));
      curs.clear();
    } else {
      curs += ch;
    }
  }
  if (!trim(curs).empty() || !out.empty()) out.push_back(trim(curs));
  return out;
}

struct ParseError {
  std::string msg;
};

Ref parse_ref(const std::string& t0, int nops) {
  std::string t = trim(t0);
  Ref r;
  if (t.size() > 1 && t[0] == '%') {
    size_t i = 1;
    while (i < t.size() && isdigit((unsigned char)t[i])) ++i;
    if (i == 1) throw ParseError{"operand '" + t + "' is not %N"};
    r.reg = atoi(t.substr(1, i - 1).c_str());
    if (r.reg >= nops) throw ParseError{"operand " + t + " has no asm operand"};
    std::string rest = trim(t.substr(i));
    if (!rest.empty()) {
      if (rest[0] != '+' && rest[0] != '-') throw ParseError{"bad operand '" + t + "'"};
      r.imm = strtoll(rest.c_str(), nullptr, 0);
    }
    return r;
  }
  char* end = nullptr;
  r.imm = strtoll(t.c_str(), &end, 0);
  if (t.empty() || *end) throw ParseError{"operand '" + t + "' is neither %N nor a number"};
  return r;
}

std::vector<int> parse_vec(const std::string& t0, size_t n, int nops) {
  std::string t = trim(t0);
  if (t.size() >= 2 && t.front() == '{' && t.back() == '}') t = t.substr(1, t.size() - 2);
  auto parts = split_top(t, ',');
  if (parts.size() != n)
    throw ParseError{"expected " + std::to_string(n) + " registers in '" + t0 + "'"};
  std::vector<int> out;
  for (auto& p : parts) {
    Ref r = parse_ref(p, nops);
    if (r.reg < 0 || r.imm) throw ParseError{"expected a register, got '" + p + "'"};
    out.push_back(r.reg);
  }
  return out;
}

Ref parse_addr(const std::string& t0, int nops) {
  std::string t = trim(t0);
  if (t.size() < 3 || t.front() != '[' || t.back() != ']')
    throw ParseError{"expected an address [%N], got '" + t0 + "'"};
  Ref r = parse_ref(t.substr(1, t.size() - 2), nops);
  if (r.reg < 0) throw ParseError{"absolute addresses are not supported: '" + t0 + "'"};
  return r;
}

// Check the asm operand constraints: outputs written, inputs readable, widths right.
void need(const std::string& cons, int reg, const char* letters, bool output) {
  auto items = split_top(cons, ',');
  const std::string& c = items.at(reg);
  char dir = c.empty() ? ' ' : c[0];
  char letter = c.empty() ? ' ' : c.back();
  if (!strchr(letters, letter))
    throw ParseError{"operand %" + std::to_string(reg) + " has constraint \"" + c +
                     "\", expected one of '" + letters + "'"};
  if (output && dir != '=' && dir != '+')
    throw ParseError{"operand %" + std::to_string(reg) + " is written but is an input"};
  if (!output && dir == '=')
    throw ParseError{"operand %" + std::to_string(reg) + " is read but is output-only (\"" +
                     c + "\"): its value is undefined"};
}

Instr parse_one(const std::string& stmt, const std::string& cons, int nops) {
  std::string s = trim(stmt);
  size_t sp = s.find_first_of(" \t");
  std::string opcode = s.substr(0, sp), rest = sp == std::string::npos ? "" : s.substr(sp);
  std::vector<std::string> mods;
  for (size_t b = 0, e; b <= opcode.size(); b = e + 1) {
    e = opcode.find('.', b);
    if (e == std::string::npos) e = opcode.size();
    mods.push_back(opcode.substr(b, e - b));
  }
  auto ops = split_top(trim(rest), ',');
  auto has = [&](const char* m) {
    return std::find(mods.begin(), mods.end(), m) != mods.end();
  };
  auto only = [&](std::initializer_list<const char*> allowed) {
    for (size_t i = 1; i < mods.size(); ++i) {
      bool ok = false;
      for (auto* a : allowed) ok = ok || mods[i] == a;
      if (!ok)
        throw ParseError{"modifier ." + mods[i] + " of '" + opcode + "' not supported"};
    }
  };
  auto nargs = [&](size_t lo, size_t hi) {
    if (ops.size() < lo || ops.size() > hi)
      throw ParseError{"'" + opcode + "' takes " + std::to_string(lo) + "-" +
                       std::to_string(hi) + " operands, got " + std::to_string(ops.size())};
  };
  Instr in;
  in.text = s;
  if (mods[0] == "cp" && mods.size() > 1 && mods[1] == "async") {
    if (opcode == "cp.async.commit_group") { nargs(0, 0); in.op = kCommit; return in; }
    if (opcode == "cp.async.wait_all") { nargs(0, 0); in.op = kWaitAll; return in; }
    if (opcode == "cp.async.wait_group") {
      nargs(1, 1);
      in.op = kWaitGroup;
      in.count = parse_ref(ops[0], nops);
      if (in.count.reg >= 0) need(cons, in.count.reg, "n", false);
      return in;
    }
    only({"async", "ca", "cg", "shared", "shared::cta", "global", "L2::64B", "L2::128B",
          "L2::256B"});
    if (has("ca") == has("cg") || !(has("shared") || has("shared::cta")) || !has("global"))
      throw ParseError{"cp.async needs one of .ca/.cg and .shared.global"};
    nargs(3, 4);
    in.op = kCpAsync;
    in.cg = has("cg");
    in.addr = parse_addr(ops[0], nops);
    in.src = parse_addr(ops[1], nops);
    need(cons, in.addr.reg, "rl", false);
    need(cons, in.src.reg, "l", false);
    Ref cs = parse_ref(ops[2], nops);
    if (cs.reg >= 0) throw ParseError{"cp-size must be a literal 4, 8 or 16"};
    in.cp_size = (int)cs.imm;
    if (in.cp_size != 4 && in.cp_size != 8 && in.cp_size != 16)
      throw ParseError{"cp-size must be 4, 8 or 16"};
    if (in.cg && in.cp_size != 16) throw ParseError{"cp.async.cg needs cp-size 16"};
    if (ops.size() == 4) {
      in.has_size = true;
      in.size = parse_ref(ops[3], nops);
      if (in.size.reg >= 0) need(cons, in.size.reg, "rn", false);
    }
    return in;
  }
  if (mods[0] == "ldmatrix") {
    only({"sync", "aligned", "m8n8", "x1", "x2", "x4", "trans", "shared", "shared::cta",
          "b16"});
    if (!has("sync") || !has("aligned") || !has("m8n8") || !has("b16"))
      throw ParseError{"ldmatrix needs .sync.aligned.m8n8 ... .b16"};
    in.op = kLdm;
    in.nmat = has("x4") ? 4 : has("x2") ? 2 : has("x1") ? 1 : 0;
    if (!in.nmat) throw ParseError{"ldmatrix needs .x1, .x2 or .x4"};
    in.trans = has("trans");
    nargs(2, 2);
    in.d = parse_vec(ops[0], (size_t)in.nmat, nops);
    for (int r : in.d) need(cons, r, "r", true);
    in.addr = parse_addr(ops[1], nops);
    need(cons, in.addr.reg, "rl", false);
    return in;
  }
  if (mods[0] == "mma") {
    bool f16 = opcode == "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32";
    bool bf16 = opcode == "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
    if (!f16 && !bf16) throw ParseError{"mma shape/types '" + opcode + "' not supported"};
    nargs(4, 4);
    in.op = kMmaOp;
    in.ab = f16 ? kF16 : kBF16;
    in.d = parse_vec(ops[0], 4, nops);
    in.a = parse_vec(ops[1], 4, nops);
    in.b = parse_vec(ops[2], 2, nops);
    in.c = parse_vec(ops[3], 4, nops);
    for (int r : in.d) need(cons, r, "f", true);
    for (int r : in.a) need(cons, r, "r", false);
    for (int r : in.b) need(cons, r, "r", false);
    for (int r : in.c) need(cons, r, "f", false);
    return in;
  }
  if (opcode == "ex2.approx.f32" || opcode == "ex2.approx.ftz.f32") {
    nargs(2, 2);
    in.op = kEx2;
    in.ftz = has("ftz");
    in.d = parse_vec(ops[0], 1, nops);
    in.a = parse_vec(ops[1], 1, nops);
    need(cons, in.d[0], "f", true);
    need(cons, in.a[0], "f", false);
    return in;
  }
  throw ParseError{"PTX instruction '" + opcode + "' is not supported by the emulator"};
}

// ------------------------------------------------------------------ operand access
uint64_t get(const Opnd& o) {
  if (o.dir == 0 || o.dir == 3) return o.bits;
  uint64_t b = 0;
  std::memcpy(&b, o.ptr, o.size);
  return b;
}
void put(const Opnd& o, uint64_t v) { std::memcpy(o.ptr, &v, o.size); }
uint64_t ref_value(const Ref& r, Opnd* ops) {
  return r.reg >= 0 ? get(ops[r.reg]) + r.imm : r.imm;
}

}  // namespace

const char* parse_sites(const Site* sites, int n) {
  static std::string err;
  g_sites.assign((size_t)n, {});
  g_cons.assign((size_t)n, "");
  g_nops.assign((size_t)n, 0);
  for (int i = 0; i < n; ++i) {
    const Site& s = sites[i];
    g_cons[i] = s.constraints;
    int nops = s.constraints[0] ? (int)split_top(s.constraints, ',').size() : 0;
    g_nops[i] = nops;
    try {
      for (auto& stmt : split_top(s.ptx, ';')) {
        if (stmt.empty()) continue;
        Instr in = parse_one(stmt, g_cons[i], nops);
        in.line = s.line;
        in.file = s.file;
        g_sites[i].push_back(in);
      }
      if (g_sites[i].empty()) throw ParseError{"no instruction"};
    } catch (const ParseError& e) {
      err = std::string(s.file) + ":" + std::to_string(s.line) + ": " + e.msg + " in \"" +
            s.ptx + "\"";
      return err.c_str();
    } catch (const std::exception& e) {
      err = std::string(s.file) + ":" + std::to_string(s.line) + ": bad asm operands (" +
            e.what() + ") in \"" + s.ptx + "\"";
      return err.c_str();
    }
  }
  return nullptr;
}

// ------------------------------------------------------------------ execution
namespace {

uint32_t h2f_bits(uint16_t h, Dtype t) {  // 16-bit value -> float
  float f;
  if (t == kF16) {
    __half_raw r;
    r.x = h;
    f = __half2float(__half(r));
  } else {
    __nv_bfloat16_raw r;
    r.x = h;
    f = __bfloat162float(__nv_bfloat16(r));
  }
  return (uint32_t)to_bits(f);
}

struct LdmLoad {
  uint32_t addr;
  unsigned tid;
  Opnd* ops;
  const Instr* in;
  void* ra;
};

void ldm_complete(void** pl, unsigned, const Key& key) {
  const Instr& in = *static_cast<LdmLoad*>(pl[0])->in;
  uint16_t rows[4][8][8];
  for (int j = 0; j < in.nmat; ++j)
    for (int r = 0; r < 8; ++r) {
      auto* p = static_cast<LdmLoad*>(pl[j * 8 + r]);
      if (p->addr % 16)
        fatal("misaligned", key.file, key.line, p->ra,
              "ldmatrix row address %u of %s is not 16-byte aligned", p->addr,
              thread_name(p->tid).c_str());
      smem_read(p->addr, 16, p->tid, key, p->ra, "ldmatrix", rows[j][r]);
    }
  for (int l = 0; l < 32; ++l) {  // lane l: row l / 4, columns 2 (l % 4) and +1
    auto* p = static_cast<LdmLoad*>(pl[l]);
    const int g = l >> 2, t = l & 3;
    for (int j = 0; j < in.nmat; ++j) {
      uint32_t lo = in.trans ? rows[j][2 * t][g] : rows[j][g][2 * t];
      uint32_t hi = in.trans ? rows[j][2 * t + 1][g] : rows[j][g][2 * t + 1];
      put(p->ops[in.d[j]], lo | hi << 16);
    }
  }
}

struct MmaLoad {
  Opnd* ops;
  const Instr* in;
};

// D (16x8) = A (16x16, row) B (16x8, col) + C; lane l holds, with g = l / 4, t = l % 4:
// a0 A[g][2t..2t+1], a1 A[g+8][2t..], a2 A[g][2t+8..], a3 A[g+8][2t+8..];
// b0 B[2t..2t+1][g], b1 B[2t+8..2t+9][g];
// c0 C[g][2t], c1 C[g][2t+1], c2 C[g+8][2t], c3 C[g+8][2t+1] (d likewise).
void mma_complete(void** pl, unsigned, const Key&) {
  const Instr& in = *static_cast<MmaLoad*>(pl[0])->in;
  float A[16][16], B[16][8], C[16][8];
  auto lo = [&](uint64_t v) { return from_bits<float>(h2f_bits((uint16_t)v, in.ab)); };
  auto hi = [&](uint64_t v) { return lo(v >> 16); };
  for (int l = 0; l < 32; ++l) {
    Opnd* o = static_cast<MmaLoad*>(pl[l])->ops;
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {
      uint64_t a = get(o[in.a[i]]);
      int r = g + 8 * (i & 1), c = 2 * t + 8 * (i >> 1);
      A[r][c] = lo(a);
      A[r][c + 1] = hi(a);
    }
    for (int i = 0; i < 2; ++i) {
      uint64_t b = get(o[in.b[i]]);
      B[2 * t + 8 * i][g] = lo(b);
      B[2 * t + 8 * i + 1][g] = hi(b);
    }
    for (int i = 0; i < 4; ++i)
      C[g + 8 * (i >> 1)][2 * t + (i & 1)] = from_bits<float>(get(o[in.c[i]]));
  }
  for (int l = 0; l < 32; ++l) {
    Opnd* o = static_cast<MmaLoad*>(pl[l])->ops;
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {
      const int r = g + 8 * (i >> 1), c = 2 * t + (i & 1);
      double acc = C[r][c];
      for (int k = 0; k < 16; ++k) acc += (double)A[r][k] * B[k][c];
      put(o[in.d[i]], to_bits((float)acc));
    }
  }
}

bool in_buffers(uint64_t src, uint64_t n) {
  for (auto& b : X().buffers)
    if (src >= b.first && src + n <= b.second) return true;
  return false;
}

void cp_async(Fiber& f, const Instr& in, Opnd* ops, const Key& k, void* ra) {
  const uint32_t dst = (uint32_t)ref_value(in.addr, ops);
  const uint64_t src = ref_value(in.src, ops);
  const uint32_t cp = (uint32_t)in.cp_size;
  uint32_t ss = in.has_size ? (uint32_t)ref_value(in.size, ops) : cp;
  if (ss > cp) {
    diag("cp-async-src-size", false, in.file, in.line, (int)f.tid, ra,
         "cp.async src-size %u exceeds cp-size %u (undefined)", ss, cp);
    ss = cp;
  }
  if (dst % cp || src % cp)
    fatal("misaligned", in.file, in.line, ra,
          "cp.async of %u bytes by %s: shared address %u or global address 0x%llx is not "
          "%u-byte aligned", cp, thread_name(f.tid).c_str(), dst, (unsigned long long)src,
          cp);
  bool src_ok = in_buffers(src, ss);
  if (!src_ok)
    diag("global-out-of-bounds", false, in.file, in.line, (int)f.tid, ra,
         "cp.async by %s reads %u bytes at global address 0x%llx, outside every buffer "
         "passed to the launch", thread_name(f.tid).c_str(), ss, (unsigned long long)src);
  if (!smem_range(dst, cp, f.tid, k, ra, "cp.async")) return;
  smem_write_begin(dst, cp, f.tid, k, ra);
  Copy c{dst, (uint8_t)cp, -1, in.line, in.file, {}};
  if (src_ok && ss) std::memcpy(c.data, reinterpret_cast<const void*>(src), ss);
  if (!src_ok) std::memset(c.data, 0xff, ss);
  std::memset(X().smem + dst, 0xff, cp);  // poisoned until the data lands
  f.copies.push_back(c);
}

float ex2(float a, bool ftz) {
  if (ftz && std::fpclassify(a) == FP_SUBNORMAL) a = std::copysign(0.f, a);
  float r = exp2f(a);
  if (ftz && std::fpclassify(r) == FP_SUBNORMAL) r = std::copysign(0.f, r);
  return r;
}

}  // namespace

void ptx_exec(int site, Opnd* ops, int n) {
  void* ra = __builtin_return_address(0);
  Fiber& f = cur();
  if (site < 0 || site >= (int)g_sites.size() || n != g_nops[site])
    fatal("internal", "", 0, ra, "asm site %d called with %d operands", site, n);
  int idx = 0;
  for (const Instr& in : g_sites[site]) {
    Key k{0, in.file, in.line, idx++, site};
    switch (in.op) {
      case kCpAsync: cp_async(f, in, ops, k, ra); break;
      case kCommit:
        for (auto& c : f.copies)
          if (c.group < 0) c.group = f.next_group;
        ++f.next_group;
        break;
      case kWaitGroup: wait_groups(f, (int)ref_value(in.count, ops)); break;
      case kWaitAll:
        for (auto& c : f.copies)
          if (c.group < 0) c.group = f.next_group;
        ++f.next_group;
        wait_groups(f, 0);
        break;
      case kLdm: {
        k.kind = kLdmatrix;
        LdmLoad me{(uint32_t)ref_value(in.addr, ops), f.tid, ops, &in, ra};
        collective(k, 0xffffffffu, &me, ldm_complete, ra);
        break;
      }
      case kMmaOp: {
        k.kind = kMma;
        MmaLoad me{ops, &in};
        collective(k, 0xffffffffu, &me, mma_complete, ra);
        break;
      }
      case kEx2:
        put(ops[in.d[0]], to_bits(ex2(from_bits<float>(get(ops[in.a[0]])), in.ftz)));
        break;
    }
  }
}

// ------------------------------------------------------------------ warp intrinsics
namespace {

struct ShflLoad {
  uint64_t in, out;
  int mode, arg, width;
  unsigned tid;
  void* ra;
};

void shfl_complete(void** pl, unsigned arrived, const Key& key) {
  for (int l = 0; l < 32; ++l) {
    if (!(arrived >> l & 1)) continue;
    auto* p = static_cast<ShflLoad*>(pl[l]);
    const int w = p->width;
    if (w < 1 || w > 32 || (w & (w - 1)))
      fatal("shuffle-width", key.file, key.line, p->ra,
            "shuffle width %d is not a power of two in [1, 32]", w);
    const int seg = l & ~(w - 1);
    int src = l;
    if (p->mode == 0) src = seg + (p->arg & (w - 1));
    else if (p->mode == 1) src = l - p->arg < seg ? l : l - p->arg;
    else if (p->mode == 2) src = l + p->arg >= seg + w ? l : l + p->arg;
    else src = (l ^ p->arg) >= seg + w ? l : (l ^ p->arg);
    if (!(arrived >> src & 1)) {
      diag("shuffle-inactive-source", false, key.file, key.line, (int)p->tid, p->ra,
           "lane %d reads lane %d, which does not take part in the shuffle (exited or "
           "not in the mask): the value is undefined", l, src);
      p->out = ~0ull;
    } else {
      p->out = static_cast<ShflLoad*>(pl[src])->in;
    }
  }
}

struct VoteLoad {
  int mode, pred;
  unsigned out;
};

void vote_complete(void** pl, unsigned arrived, const Key&) {
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if ((arrived >> l & 1) && static_cast<VoteLoad*>(pl[l])->pred) ballot |= 1u << l;
  for (int l = 0; l < 32; ++l)
    if (arrived >> l & 1) {
      auto* p = static_cast<VoteLoad*>(pl[l]);
      p->out = p->mode == 0 ? ballot : p->mode == 1 ? ballot != 0 : ballot == arrived;
    }
}

void syncwarp_complete(void** pl, unsigned arrived, const Key&) {
  X().warps[*static_cast<int*>(pl[__builtin_ctz(arrived)])].epoch++;
}

Key where_key(int kind, const Where& w) {
  return Key{kind, w.file_name(), (int)w.line(), (int)w.column(), -1};
}

}  // namespace

uint64_t shfl(int mode, unsigned mask, uint64_t bits, int arg, int width, const Where& w) {
  void* ra = __builtin_return_address(0);
  ShflLoad me{bits, 0, mode, arg, width, cur().tid, ra};
  collective(where_key(kShfl, w), mask, &me, shfl_complete, ra);
  return me.out;
}

unsigned vote(int mode, unsigned mask, int pred, const Where& w) {
  void* ra = __builtin_return_address(0);
  VoteLoad me{mode, pred, 0};
  collective(where_key(kVote, w), mask, &me, vote_complete, ra);
  return me.out;
}

void syncwarp(unsigned mask, const Where& w) {
  void* ra = __builtin_return_address(0);
  int warp = cur().warp;
  collective(where_key(kSyncwarp, w), mask, &warp, syncwarp_complete, ra);
}

size_t cvta_shared(const void* p, const Where& w) {
  Exec& x = X();
  auto* c = static_cast<const unsigned char*>(p);
  if (c >= x.smem && c <= x.smem + EMU_SMEM_CAPACITY) return (size_t)(c - x.smem);
  diag("not-shared", false, w.file_name(), (int)w.line(), (int)cur().tid,
       __builtin_return_address(0),
       "__cvta_generic_to_shared of %p, which is not in the block's dynamic shared memory "
       "(static __shared__ variables are not emulated)", p);
  return 0xffffffffu;
}

}  // namespace emu

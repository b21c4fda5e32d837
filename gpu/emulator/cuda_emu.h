// CUDA on the CPU, for refattn's kernel emulator: the declarations a CUDA kernel source
// needs when compiled by g++ as host C++ (refattn.gpu.emulator builds it; see README.md).
//
// * execution-space keywords become nothing; `__shared__` becomes `thread_local` (one block
//   runs at a time on an OS thread, each CUDA thread a fiber on it);
// * threadIdx / blockIdx / blockDim / gridDim are thread_local, set by the scheduler at
//   every switch to a fiber;
// * __syncthreads, __syncwarp, shuffles and votes call the runtime (emu_runtime.cpp), which
//   checks that every lane of the mask arrives at the same call (file, line, column) and
//   reports deadlocks instead of hanging;
// * inline PTX: refattn.gpu.emulator rewrites each `asm volatile("..." : outs : ins)` into
//   `::emu::ptx(site, ::emu::out<'r'>(x), ::emu::in<'l'>(p), ...)`; the runtime parses the
//   site's PTX string and executes it (emu_ptx.cpp).
// cuda_fp16.h / cuda_bf16.h come from the CUDA toolkit, compiled for the host.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <source_location>
#include <string>
#include <type_traits>
#include <utility>

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __shared__
#undef __constant__
#undef __align__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ thread_local
#define __constant__ const
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__

// Dynamic shared memory of one block: the `extern __shared__` array of the kernel source is
// defined (thread_local, this size) before the source; a launch may use up to this much.
#define EMU_SMEM_CAPACITY (256 * 1024)

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
static constexpr int warpSize = 32;

namespace emu {

using Where = std::source_location;

// One inline-asm operand: `dir` 0 input (value in `bits`), 1 output, 2 in-out (through
// `ptr`), 3 immediate ("n"); `cons` the constraint letter, `size` its width in bytes.
struct Opnd {
  void* ptr;
  uint64_t bits;
  uint8_t size;
  char cons;
  uint8_t dir;
};

// An asm statement of the source: its PTX text and where it is.
struct Site {
  const char* ptx;
  const char* constraints;  // e.g. "=r,=r,r" (outputs first, as numbered in the PTX)
  const char* file;
  int line;
};

// A kernel instantiation: launch thunk (kernelParams as for cuLaunchKernel) and signature.
struct Kernel {
  const char* name;
  void (*thunk)(void**);
  const char* (*signature)();
};

// Runtime entry points (emu_runtime.cpp, emu_ptx.cpp).
void ptx_exec(int site, Opnd* ops, int n);
void syncthreads(const Where& w);
void syncwarp(unsigned mask, const Where& w);
uint64_t shfl(int mode, unsigned mask, uint64_t bits, int arg, int width, const Where& w);
unsigned vote(int mode, unsigned mask, int pred, const Where& w);
size_t cvta_shared(const void* p, const Where& w);

template <char C> constexpr int constraint_size() {
  static_assert(C == 'r' || C == 'f' || C == 'l' || C == 'd' || C == 'h' || C == 'c',
                "inline-asm constraint not supported by the emulator");
  return C == 'l' || C == 'd' ? 8 : C == 'h' ? 2 : C == 'c' ? 1 : 4;
}

template <char C, class T> inline Opnd out(T& x) {
  static_assert(!std::is_const_v<T>, "asm output must be a modifiable lvalue");
  static_assert(sizeof(T) == constraint_size<C>(), "asm operand size != its constraint's");
  return {&x, 0, static_cast<uint8_t>(sizeof(T)), C, 1};
}
template <char C, class T> inline Opnd inout(T& x) {
  static_assert(!std::is_const_v<T>, "asm in-out operand must be a modifiable lvalue");
  static_assert(sizeof(T) == constraint_size<C>(), "asm operand size != its constraint's");
  return {&x, 0, static_cast<uint8_t>(sizeof(T)), C, 2};
}
template <char C, class T> inline Opnd in(const T& x) {
  static_assert(sizeof(T) == constraint_size<C>(), "asm operand size != its constraint's");
  uint64_t b = 0;
  if constexpr (std::is_pointer_v<T>) b = reinterpret_cast<uintptr_t>(x);
  else std::memcpy(&b, &x, sizeof(T));
  return {nullptr, b, static_cast<uint8_t>(sizeof(T)), C, 0};
}
template <class T> inline Opnd imm(T x) {
  static_assert(std::is_integral_v<T>, "\"n\" operands must be integer constants");
  return {nullptr, static_cast<uint64_t>(static_cast<long long>(x)), 8, 'n', 3};
}

template <class... O> inline void ptx(int site, O... ops) {
  Opnd a[sizeof...(O) + 1] = {ops...};
  ptx_exec(site, a, static_cast<int>(sizeof...(O)));
}

template <class T> inline uint64_t to_bits(const T& x) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>,
                "shuffles move values of at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &x, sizeof(T));
  return b;
}
template <class T> inline T from_bits(uint64_t b) {
  T x;
  std::memcpy(&x, &b, sizeof(T));
  return x;
}

// Kernel parameter types, as the Python side checks the launch arguments against them.
template <class T> inline std::string type_code() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_pointer_v<U>) {
    using P = std::remove_pointer_t<U>;
    return (std::is_const_v<P> ? "const " : "") + type_code<std::remove_cv_t<P>>() + "*";
  } else if constexpr (std::is_same_v<U, float>) return "float";
  else if constexpr (std::is_same_v<U, double>) return "double";
  else if constexpr (std::is_same_v<U, int>) return "int";
  else if constexpr (std::is_same_v<U, unsigned>) return "unsigned";
  else if constexpr (std::is_same_v<U, long long>) return "long long";
  else if constexpr (std::is_same_v<U, unsigned long long>) return "unsigned long long";
  else if constexpr (std::is_same_v<U, short>) return "short";
  else if constexpr (std::is_same_v<U, unsigned short>) return "unsigned short";
  else if constexpr (std::is_same_v<U, signed char>) return "signed char";
  else if constexpr (std::is_same_v<U, unsigned char>) return "unsigned char";
  else if constexpr (std::is_same_v<U, bool>) return "bool";
  else if constexpr (std::is_same_v<U, __half>) return "__half";
  else if constexpr (std::is_same_v<U, __nv_bfloat16>) return "__nv_bfloat16";
  else return "?";
}
template <class... A> inline const char* signature(void (*)(A...)) {
  static const std::string s = [] {
    std::string out;
    ((out += (out.empty() ? "" : ",") + type_code<A>()), ...);
    return out;
  }();
  return s.c_str();
}
template <class... A, size_t... I>
inline void invoke_(void (*f)(A...), void** p, std::index_sequence<I...>) {
  f(*static_cast<std::remove_cv_t<A>*>(p[I])...);
}
template <class... A> inline void invoke(void (*f)(A...), void** p) {
  invoke_(f, p, std::index_sequence_for<A...>{});
}

}  // namespace emu

// ------------------------------------------------------------------- CUDA intrinsics
inline void __syncthreads(const emu::Where& w = emu::Where::current()) {
  emu::syncthreads(w);
}
inline void __syncwarp(unsigned mask = 0xffffffffu,
                       const emu::Where& w = emu::Where::current()) {
  emu::syncwarp(mask, w);
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src, int width = warpSize,
                     const emu::Where& w = emu::Where::current()) {
  return emu::from_bits<T>(emu::shfl(0, mask, emu::to_bits(var), src, width, w));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const emu::Where& w = emu::Where::current()) {
  return emu::from_bits<T>(emu::shfl(1, mask, emu::to_bits(var), (int)delta, width, w));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const emu::Where& w = emu::Where::current()) {
  return emu::from_bits<T>(emu::shfl(2, mask, emu::to_bits(var), (int)delta, width, w));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         const emu::Where& w = emu::Where::current()) {
  return emu::from_bits<T>(emu::shfl(3, mask, emu::to_bits(var), lane_mask, width, w));
}
inline unsigned __ballot_sync(unsigned mask, int pred,
                              const emu::Where& w = emu::Where::current()) {
  return emu::vote(0, mask, pred, w);
}
inline int __any_sync(unsigned mask, int pred,
                      const emu::Where& w = emu::Where::current()) {
  return (int)emu::vote(1, mask, pred, w);
}
inline int __all_sync(unsigned mask, int pred,
                      const emu::Where& w = emu::Where::current()) {
  return (int)emu::vote(2, mask, pred, w);
}
inline size_t __cvta_generic_to_shared(const void* p,
                                       const emu::Where& w = emu::Where::current()) {
  return emu::cvta_shared(p, w);
}

inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __int_as_float(int x) { return emu::from_bits<float>((uint32_t)x); }
inline float __uint_as_float(unsigned x) { return emu::from_bits<float>(x); }
inline int __float_as_int(float x) { return (int)(uint32_t)emu::to_bits(x); }
inline unsigned __float_as_uint(float x) { return (uint32_t)emu::to_bits(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// CUDA's min / max overloads (integer and floating, mixed types to the common type).
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return (C)b < (C)a ? (C)b : (C)a;
}
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return (C)a < (C)b ? (C)b : (C)a;
}

// Shared device helpers for refattn's attention kernels: dtype conversion, the
// (causal / sliding-window) band test, the block-mask bit test and the score transform.
// Only CUDA headers: NVRTC has no host standard library.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef INFINITY  // NVRTC has no <cmath>
#define INFINITY __int_as_float(0x7f800000)
#endif

namespace refattn {

__device__ constexpr float kLog2e = 1.4426950408889634f;
[[maybe_unused]] __device__ constexpr float kLn2 = 0.6931471805599453f;

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Bottom-right aligned band: query row i sits at position i + (M - N); key j is kept iff
// -right <= i + (M - N) - j <= left. "Unbounded" sides are passed as 2^60.
__device__ __forceinline__ bool in_band(long long i, long long j, long long offset,
                                        long long left, long long right) {
  const long long d = i + offset - j;
  return d <= left && d >= -right;
}

// Block-mask bitmap of one PARTIAL tile: BM rows of BN bits, BN / 32 words per row.
template <int BM, int BN>
__device__ __forceinline__ bool tile_bit(const unsigned* bits, int tile, int row, int col) {
  const unsigned word = bits[((long long)tile * BM + row) * (BN / 32) + (col >> 5)];
  return (word >> (col & 31)) & 1u;
}

// Raw logit q.k -> scaled (optionally soft-capped) logit, in units of log2(e) when
// `log2_units` (the fast kernel uses exp2) or natural units otherwise.
__device__ __forceinline__ float transform_logit(float dot, float scale, float softcap,
                                                 bool log2_units) {
  float s = dot * scale;
  if (softcap > 0.f) s = softcap * tanhf(__fdividef(s, softcap));
  return log2_units ? s * kLog2e : s;
}

}  // namespace refattn

// The simple forward kernel: one warp per query row, keys visited one at a time with the
// exact streaming softmax update, all arithmetic in float32 (no tensor cores, no shared
// memory, no pipelining). It exists to be obviously correct, as a GPU baseline for the
// fast kernel; it also is the float32-input path.
//
// Layout: q (B, Hq, N, D), k/v (B, Hkv, M, D), o (B, Hq, N, D), lse (B, Hq, N) float32,
// contiguous. Grid (ceil(N / 4), Hq, B), block 128 threads (4 warps = 4 query rows).
// Lane `l` holds elements d = l + 32 t of its row. For every kept key j:
//   s = transform(q . k_j);  m' = max(m, s);  l' = e^{m-m'} l + e^{s-m'};
//   acc' = e^{m-m'} acc + e^{s-m'} v_j
// and finally o = acc / l (0 when l = 0), lse = m + log l (-inf when l = 0).
// Key tiles (BM x BN, the same tiling as the fast kernel) come from the CSR tile list
// when use_list != 0 (block masks; PARTIAL tiles carry a bitmap), else every key tile.
#include "common.cuh"

template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(128)
flash_fwd_simple(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                 T* __restrict__ o, float* __restrict__ lse, int B, int Hq, int Hkv, int N,
                 int M, float scale, float softcap, long long left, long long right,
                 const int* __restrict__ indptr, const int* __restrict__ tile_k,
                 const int* __restrict__ tile_bits, const unsigned* __restrict__ bits,
                 int use_list) {
  static_assert(D % 32 == 0, "head dim must be a multiple of 32");
  constexpr int PER = D / 32;
  const int lane = threadIdx.x & 31;
  const int i = blockIdx.x * 4 + (threadIdx.x >> 5);
  const int h = blockIdx.y, b = blockIdx.z;
  if (i >= N) return;  // no block-level synchronisation below
  const int hk = h / (Hq / Hkv);
  const long long offset = (long long)M - N;
  const T* qrow = q + (((long long)b * Hq + h) * N + i) * D;
  const T* kbase = k + ((long long)b * Hkv + hk) * M * D;
  const T* vbase = v + ((long long)b * Hkv + hk) * M * D;

  float qv[PER], acc[PER];
#pragma unroll
  for (int t = 0; t < PER; ++t) {
    qv[t] = refattn::to_float(qrow[lane + 32 * t]);
    acc[t] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const int qt = i / BM;
  const int n_k_tiles = (M + BN - 1) / BN;
  const int start = use_list ? indptr[qt] : 0;
  const int stop = use_list ? indptr[qt + 1] : n_k_tiles;
  for (int it = start; it < stop; ++it) {
    const int kt = use_list ? tile_k[it] : it;
    const int bit = use_list ? tile_bits[it] : -1;
    const int c0 = kt * BN;
    const int c1 = min(c0 + BN, M);
    for (int j = c0; j < c1; ++j) {
      bool keep = refattn::in_band(i, j, offset, left, right);
      if (bit >= 0) keep = keep && refattn::tile_bit<BM, BN>(bits, bit, i - qt * BM, j - c0);
      if (!keep) continue;  // uniform across the warp
      float dot = 0.f;
#pragma unroll
      for (int t = 0; t < PER; ++t)
        dot += qv[t] * refattn::to_float(kbase[(long long)j * D + lane + 32 * t]);
#pragma unroll
      for (int w = 16; w > 0; w >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, w);
      const float s = refattn::transform_logit(dot, scale, softcap, false);
      const float m_new = fmaxf(m, s);
      const float alpha = expf(m - m_new);  // 0 while nothing was kept (m = -inf)
      const float p = expf(s - m_new);
      l = l * alpha + p;
#pragma unroll
      for (int t = 0; t < PER; ++t)
        acc[t] = acc[t] * alpha + p * refattn::to_float(vbase[(long long)j * D + lane + 32 * t]);
      m = m_new;
    }
  }
  const float inv = l > 0.f ? __fdividef(1.f, l) : 0.f;
  T* orow = o + (((long long)b * Hq + h) * N + i) * D;
#pragma unroll
  for (int t = 0; t < PER; ++t) orow[lane + 32 * t] = refattn::from_float<T>(acc[t] * inv);
  if (lane == 0) lse[((long long)b * Hq + h) * N + i] = l > 0.f ? m + logf(l) : -INFINITY;
}

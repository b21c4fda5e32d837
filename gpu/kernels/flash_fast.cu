// The fast forward kernel, FlashAttention-2 style (Dao 2023), mirroring the block
// algorithm of refattn.tiled_attention: for one (batch, query head, BM-row query tile)
// the visited key tiles are streamed through shared memory and the online softmax
//   m' = max(m, rowmax S),  l' = 2^{m-m'} l + sum 2^{S-m'},  acc' = 2^{m-m'} acc + P V
// runs in registers (logits in log2 units, exp2), finishing o = acc / l and
// lse = ln2 (m + log2 l); rows with nothing kept give o = 0, lse = -inf.
//
// Tensor cores: mma.sync m16n8k16 (fp16 or bf16 inputs, fp32 accumulation). Each of the
// WARPS warps owns 16 query rows (BM = 16 WARPS). Q, K and V tiles arrive by cp.async
// (16-byte chunks, tails zero-filled), K/V double-buffered (2 stages: the next tile is in
// flight while this one is computed), in swizzled shared memory read with ldmatrix
// (ldmatrix.trans for V). P is converted from the S accumulators to A fragments in
// registers without going through shared memory.
//
// Layout: q (B, Hq, N, D), k/v (B, Hkv, M, D), o (B, Hq, N, D), lse (B, Hq, N) float32,
// contiguous, 16-byte aligned. Grid (ceil(N / BM), Hq, B), block 32 WARPS threads,
// dynamic shared memory (BM + 4 BN) * row_bytes (see SmemRows).
// Key tiles: the CSR list (indptr, tile_k, tile_bits) when use_list != 0 (tile_bits >= 0
// marks a PARTIAL tile with a bitmap in `bits`), else the range the band allows.
#include "common.cuh"
#include "mma.cuh"

template <typename T, int D, int BM, int BN, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
flash_fwd_fast(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
               T* __restrict__ o, float* __restrict__ lse, int B, int Hq, int Hkv, int N,
               int M, float scale, float softcap, long long left, long long right,
               const int* __restrict__ indptr, const int* __restrict__ tile_k,
               const int* __restrict__ tile_bits, const unsigned* __restrict__ bits,
               int use_list) {
  using namespace refattn;
  using L = SmemRows<D>;
  constexpr int THREADS = WARPS * 32;
  constexpr int NT = BN / 8;   // 8-key column tiles of S per warp
  constexpr int DT = D / 8;    // 8-wide column tiles of the output accumulator
  static_assert(BM == 16 * WARPS, "each warp owns 16 query rows");
  static_assert(BN % 16 == 0 && D % 16 == 0, "tile sizes must be multiples of 16");
  static_assert(BN % 32 == 0, "tile bitmaps hold whole 32-bit words per row");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * L::ELEMS;   // 2 stages of BN rows
  T* sV = sK + 2 * BN * L::ELEMS;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;  // mma fragment row group / thread in group
  // Last query tiles first: under a causal mask they have the most key tiles, and blocks
  // are started roughly in blockIdx order, so the long ones do not end up in the tail.
  const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (Hq / Hkv);
  const int r0 = qt * BM;
  const long long offset = (long long)M - N;
  const T* qg = q + ((long long)b * Hq + h) * N * D;
  const T* kg = k + ((long long)b * Hkv + hk) * M * D;
  const T* vg = v + ((long long)b * Hkv + hk) * M * D;

  // Key tiles to visit: [first, first + count).
  int first, count;
  if (use_list) {
    first = indptr[qt];
    count = indptr[qt + 1] - first;
  } else {
    const long long r_last = min(r0 + BM, N) - 1;
    const long long j_min = max(0LL, r0 + offset - left);
    const long long j_max = min((long long)M - 1, r_last + offset + right);
    first = (int)(j_min / BN);
    count = j_min > j_max ? 0 : (int)(j_max / BN) - first + 1;
  }
  auto key_tile = [&](int it) { return use_list ? tile_k[first + it] : first + it; };

  // Prologue: Q and the first K/V tile form group 0.
  load_tile<T, D, BM, THREADS>(sQ, qg, r0, N);
  if (count > 0) {
    load_tile<T, D, BN, THREADS>(sK, kg, key_tile(0) * BN, M);
    load_tile<T, D, BN, THREADS>(sV, vg, key_tile(0) * BN, M);
  }
  cp_async_commit();

  float acc[DT][4];
#pragma unroll
  for (int t = 0; t < DT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8 of this warp, log2 units
  float row_sum[2] = {0.f, 0.f};              // this thread's share of l

  const int wrow = warp * 16;  // first row of this warp inside the tile
  for (int it = 0; it < count; ++it) {
    const int stage = it & 1;
    if (it + 1 < count) {  // prefetch the next tile into the other stage
      const int nk = key_tile(it + 1) * BN;
      load_tile<T, D, BN, THREADS>(sK + (stage ^ 1) * BN * L::ELEMS, kg, nk, M);
      load_tile<T, D, BN, THREADS>(sV + (stage ^ 1) * BN * L::ELEMS, vg, nk, M);
    }
    cp_async_commit();   // possibly empty group: keeps the wait count uniform
    cp_async_wait<1>();  // everything but the prefetch just issued has landed
    __syncthreads();

    const T* tK = sK + stage * BN * L::ELEMS;
    const T* tV = sV + stage * BN * L::ELEMS;
    const int kt = key_tile(it);
    const int c0 = kt * BN;
    const int bit = use_list ? tile_bits[first + it] : -1;

    // S = Q K^T for this warp's 16 rows and BN keys.
    float s[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      unsigned a[4];  // rows wrow + lane % 16, columns 16 kk + 8 (lane / 16)
      ldmatrix_x4(a, sQ + L::offset(wrow + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
      for (int n2 = 0; n2 < NT / 2; ++n2) {
        // matrices: (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7), (8-15, 8-15)
        const int mat = lane >> 3;
        unsigned bk[4];
        ldmatrix_x4(bk, tK + L::offset(16 * n2 + (mat >> 1) * 8 + (lane & 7),
                                       2 * kk + (mat & 1)));
        Mma<T>::run(s[2 * n2], a, bk[0], bk[1]);
        Mma<T>::run(s[2 * n2 + 1], a, bk[2], bk[3]);
      }
    }

    // Scale, soft-cap and mask. Element e of column tile n: row wrow + g + 8 (e / 2),
    // key c0 + 8 n + 2 tig + e % 2.
    const long long i_lo = r0, i_hi = r0 + BM - 1;
    const bool band_full = (i_lo + offset - (c0 + BN - 1) >= -right) &&
                           (i_hi + offset - c0 <= left);
    const bool need_mask = bit >= 0 || c0 + BN > M || !band_full;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = transform_logit(s[n][e], scale, softcap, true);
        if (need_mask) {
          const int rl = wrow + g + 8 * (e >> 1), cl = 8 * n + 2 * tig + (e & 1);
          bool keep = c0 + cl < M && in_band(r0 + rl, c0 + cl, offset, left, right);
          if (bit >= 0) keep = keep && tile_bit<BM, BN>(bits, bit, rl, cl);
          if (!keep) x = -INFINITY;
        }
        s[n][e] = x;
      }
    }

    // Online softmax for rows g (r = 0) and g + 8 (r = 1); a row lives in 4 threads.
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int n = 0; n < NT; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.f : mx;  // nothing kept yet: avoid inf - inf
      alpha[r] = exp2f(row_max[r] - base);             // 0 while nothing was kept
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        s[n][2 * r] = exp2f(s[n][2 * r] - base);
        s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - base);
        sum += s[n][2 * r] + s[n][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha[r] + sum;
      row_max[r] = mx;
    }
#pragma unroll
    for (int t = 0; t < DT; ++t) {
      acc[t][0] *= alpha[0];
      acc[t][1] *= alpha[0];
      acc[t][2] *= alpha[1];
      acc[t][3] *= alpha[1];
    }

    // acc += P V, P's A fragments straight from the S accumulators.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      unsigned a[4];
      a[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);          // row g,     keys 0-7
      a[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);          // row g + 8, keys 0-7
      a[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);  // row g,     keys 8-15
      a[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);  // row g + 8, keys 8-15
#pragma unroll
      for (int d2 = 0; d2 < DT / 2; ++d2) {
        // transposed matrices: (keys 0-7, d 0-7), (keys 8-15, d 0-7), (0-7, 8-15), (8-15, 8-15)
        const int mat = lane >> 3;
        unsigned bv[4];
        ldmatrix_x4_trans(bv, tV + L::offset(16 * kk + (mat & 1) * 8 + (lane & 7),
                                             2 * d2 + (mat >> 1)));
        Mma<T>::run(acc[2 * d2], a, bv[0], bv[1]);
        Mma<T>::run(acc[2 * d2 + 1], a, bv[2], bv[3]);
      }
    }
    __syncthreads();  // all warps are done with this stage before it is refilled
  }
  cp_async_wait<0>();

  // Finish: o = acc / l, lse = ln2 (m + log2 l).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? __fdividef(1.f, l) : 0.f;
    const int i = r0 + wrow + g + 8 * r;
    if (i < N) {
      T* orow = o + (((long long)b * Hq + h) * N + i) * D;
#pragma unroll
      for (int t = 0; t < DT; ++t) {
        orow[8 * t + 2 * tig] = from_float<T>(acc[t][2 * r] * inv);
        orow[8 * t + 2 * tig + 1] = from_float<T>(acc[t][2 * r + 1] * inv);
      }
      if (tig == 0)
        lse[((long long)b * Hq + h) * N + i] =
            l > 0.f ? (row_max[r] + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

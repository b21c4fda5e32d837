// FlashAttention-2 backward (Dao 2023, Algorithm 2), deterministic (no atomics). With
// P = exp(S - lse) recomputed from the forward's lse (natural log), S the scaled (and
// soft-capped, S = c tanh(scale q.k / c)) logit:
//   delta_i = sum_d dO_id O_id                       (flash_bwd_preprocess, float32)
//   dV_j = sum_i P_ij dO_i,  dS_ij = P_ij (dO_i . V_j - delta_i)
//   dK_j = sum_i dS'_ij Q_i  (dk/dv kernels: parallel over keys; a KV head's group of
//                             query heads summed in the loop, so GQA needs no atomics)
//   dQ_i = sum_j dS'_ij K_j  (dq kernels: parallel over query rows)
// where dS' = dS scale (1 - tanh^2) with softcap (dS' = dS scale without). Only kept
// pairs (band, block mask) contribute; rows with lse = -inf (nothing kept) contribute 0.
// Simple kernels (float32 arithmetic, every dtype): 128 threads = 4 warps = 4 rows, lane
// l holds elements d = l + 32 t; grids (ceil(N / 4), Hq, B) (preprocess, dq) and
// (ceil(M / 4), Hkv, B) (dk/dv). Tensor-core kernels: below.
// Layout: q, o, do, dq (B, Hq, N, D); k, v, dk, dv (B, Hkv, M, D); lse, delta (B, Hq, N)
// float32; contiguous. Tiles (BM query rows x BN keys, the forward's): use_list != 0
// takes the block mask's lists, dq the per-query-tile CSR (indptr, tile_k, tile_bits),
// dk/dv the transposed per-key-tile one (indptr, tile_q, tile_bits); tile_bits >= 0 marks
// a PARTIAL tile with a BM x BN bitmap in `bits`.
#include "common.cuh"
#include "mma.cuh"

namespace refattn {

// Logit S and dS'/dS (the chain factor from the raw dot product) for one pair.
__device__ __forceinline__ void logit_and_slope(float dot, float scale, float softcap,
                                                float& s, float& slope) {
  s = dot * scale;
  slope = scale;
  if (softcap > 0.f) {
    const float t = tanhf(__fdividef(s, softcap));
    s = softcap * t;
    slope = scale * (1.f - t * t);
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int w = 16; w > 0; w >>= 1) x += __shfl_xor_sync(0xffffffffu, x, w);
  return x;
}

}  // namespace refattn

template <typename T, int D>
__global__ void __launch_bounds__(128)
flash_bwd_preprocess(const T* __restrict__ o, const T* __restrict__ dout,
                     float* __restrict__ delta, int Hq, int N) {
  constexpr int PER = D / 32;
  const int lane = threadIdx.x & 31;
  const int i = blockIdx.x * 4 + (threadIdx.x >> 5);
  if (i >= N) return;
  const long long row = ((long long)blockIdx.z * Hq + blockIdx.y) * N + i;
  float acc = 0.f;
#pragma unroll
  for (int t = 0; t < PER; ++t)
    acc += refattn::to_float(o[row * D + lane + 32 * t]) *
           refattn::to_float(dout[row * D + lane + 32 * t]);
  acc = refattn::warp_sum(acc);
  if (lane == 0) delta[row] = acc;
}

template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(128)
flash_bwd_dq_simple(const T* __restrict__ q, const T* __restrict__ k,
                    const T* __restrict__ v, const T* __restrict__ dout,
                    const float* __restrict__ lse, const float* __restrict__ delta,
                    T* __restrict__ dq, int B, int Hq, int Hkv, int N, int M, float scale,
                    float softcap, long long left, long long right,
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
  const long long row = ((long long)b * Hq + h) * N + i;
  const T* kbase = k + ((long long)b * Hkv + hk) * M * D;
  const T* vbase = v + ((long long)b * Hkv + hk) * M * D;
  const float lse_i = lse[row], delta_i = delta[row];
  float qv[PER], dov[PER], acc[PER];
#pragma unroll
  for (int t = 0; t < PER; ++t) {
    qv[t] = refattn::to_float(q[row * D + lane + 32 * t]);
    dov[t] = refattn::to_float(dout[row * D + lane + 32 * t]);
    acc[t] = 0.f;
  }
  const int qt = i / BM;
  const int n_k_tiles = (M + BN - 1) / BN;
  // A row with nothing kept (lse = -inf) contributes nothing: skip its keys.
  const int start = use_list ? indptr[qt] : 0;
  const int stop = lse_i == -INFINITY ? start : (use_list ? indptr[qt + 1] : n_k_tiles);
  for (int it = start; it < stop; ++it) {
    const int kt = use_list ? tile_k[it] : it;
    const int bit = use_list ? tile_bits[it] : -1;
    const int c0 = kt * BN;
    const int c1 = min(c0 + BN, M);
    for (int j = c0; j < c1; ++j) {
      bool keep = refattn::in_band(i, j, offset, left, right);
      if (bit >= 0)
        keep = keep && refattn::tile_bit<BM, BN>(bits, bit, i - qt * BM, j - c0);
      if (!keep) continue;  // uniform across the warp
      float dot = 0.f, dp = 0.f;
#pragma unroll
      for (int t = 0; t < PER; ++t) {
        dot += qv[t] * refattn::to_float(kbase[(long long)j * D + lane + 32 * t]);
        dp += dov[t] * refattn::to_float(vbase[(long long)j * D + lane + 32 * t]);
      }
      dot = refattn::warp_sum(dot);
      dp = refattn::warp_sum(dp);
      float s, slope;
      refattn::logit_and_slope(dot, scale, softcap, s, slope);
      const float ds = expf(s - lse_i) * (dp - delta_i) * slope;
#pragma unroll
      for (int t = 0; t < PER; ++t)
        acc[t] += ds * refattn::to_float(kbase[(long long)j * D + lane + 32 * t]);
    }
  }
#pragma unroll
  for (int t = 0; t < PER; ++t)
    dq[row * D + lane + 32 * t] = refattn::from_float<T>(acc[t]);
}

template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(128, 4)  // (128): ptxas took 64 registers and spilled 8 B
flash_bwd_dkdv_simple(const T* __restrict__ q, const T* __restrict__ k,
                      const T* __restrict__ v, const T* __restrict__ dout,
                      const float* __restrict__ lse, const float* __restrict__ delta,
                      T* __restrict__ dk, T* __restrict__ dv, int B, int Hq, int Hkv, int N,
                      int M, float scale, float softcap, long long left, long long right,
                      const int* __restrict__ indptr, const int* __restrict__ tile_q,
                      const int* __restrict__ tile_bits, const unsigned* __restrict__ bits,
                      int use_list) {
  static_assert(D % 32 == 0, "head dim must be a multiple of 32");
  constexpr int PER = D / 32;
  const int lane = threadIdx.x & 31;
  const int j = blockIdx.x * 4 + (threadIdx.x >> 5);
  const int hk = blockIdx.y, b = blockIdx.z;
  if (j >= M) return;  // no block-level synchronisation below
  const int group = Hq / Hkv;
  const long long offset = (long long)M - N;
  const long long krow = ((long long)b * Hkv + hk) * M + j;
  float kv[PER], vv[PER], dka[PER], dva[PER];
#pragma unroll
  for (int t = 0; t < PER; ++t) {
    kv[t] = refattn::to_float(k[krow * D + lane + 32 * t]);
    vv[t] = refattn::to_float(v[krow * D + lane + 32 * t]);
    dka[t] = dva[t] = 0.f;
  }
  const int kt = j / BN;
  // Without a list: the query rows the band allows, -right <= i + offset - j <= left.
  const long long i_lo = max(0LL, j - offset - right);
  const long long i_hi = min((long long)N - 1, j - offset + left);
  const int start = use_list ? indptr[kt] : (i_lo > i_hi ? 0 : (int)(i_lo / BM));
  const int stop = use_list ? indptr[kt + 1] : (i_lo > i_hi ? 0 : (int)(i_hi / BM) + 1);
  for (int hh = 0; hh < group; ++hh) {  // the query heads sharing this KV head
    const int h = hk * group + hh;
    const long long qbase = ((long long)b * Hq + h) * N;
    for (int it = start; it < stop; ++it) {
      const int qt = use_list ? tile_q[it] : it;
      const int bit = use_list ? tile_bits[it] : -1;
      const int r1 = min(qt * BM + BM, N);
      for (int i = qt * BM; i < r1; ++i) {
        bool keep = refattn::in_band(i, j, offset, left, right);
        if (bit >= 0) keep = keep && refattn::tile_bit<BM, BN>(bits, bit, i - qt * BM,
                                                               j - kt * BN);
        const float lse_i = lse[qbase + i];
        if (!keep || lse_i == -INFINITY) continue;  // uniform across the warp
        const T* qrow = q + (qbase + i) * D;
        const T* dorow = dout + (qbase + i) * D;
        float dot = 0.f, dp = 0.f;
#pragma unroll
        for (int t = 0; t < PER; ++t) {
          dot += kv[t] * refattn::to_float(qrow[lane + 32 * t]);
          dp += vv[t] * refattn::to_float(dorow[lane + 32 * t]);
        }
        dot = refattn::warp_sum(dot);
        dp = refattn::warp_sum(dp);
        float s, slope;
        refattn::logit_and_slope(dot, scale, softcap, s, slope);
        const float p = expf(s - lse_i);
        const float ds = p * (dp - delta[qbase + i]) * slope;
#pragma unroll
        for (int t = 0; t < PER; ++t) {
          dva[t] += p * refattn::to_float(dorow[lane + 32 * t]);
          dka[t] += ds * refattn::to_float(qrow[lane + 32 * t]);
        }
      }
    }
  }
#pragma unroll
  for (int t = 0; t < PER; ++t) {
    dk[krow * D + lane + 32 * t] = refattn::from_float<T>(dka[t]);
    dv[krow * D + lane + 32 * t] = refattn::from_float<T>(dva[t]);
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core kernels (fp16 / bf16 inputs, fp32 accumulation): mma.sync m16n8k16,
// ldmatrix (.trans for the operands whose rows are the reduction), cp.async double
// buffering, swizzled shared memory: the building blocks of mma.cuh (SmemRows, load_tile,
// ldmatrix_x4[_trans], Mma<T>, cp_async_*), shared with flash_fast.cu.
//   flash_bwd_dq_fast<T, D, BM, BN, WARPS>: one block per (query tile, head, batch), each
//     warp 16 query rows; per visited key tile S = Q K^T, dP = dO V^T (shared K, V
//     stages), dS = P (dP - delta) slope in registers, dQ += dS K (K read .trans).
//   flash_bwd_dkdv_fast<T, D, BM, BN>: one block per (key tile, KV head, batch), each of
//     BN / 16 warps 16 keys (K, V tiles loaded once); per (query head of the group, query
//     tile), in 16-query chunks, S^T = K Q^T, dP^T = V dO^T, then dV += P^T dO and
//     dK += dS^T Q (Q, dO read .trans), no atomics.
// Masked entries get S = -inf and P = exp2(S log2e - lse log2e) = 0; a row with lse = -inf
// (nothing kept) uses +inf instead (no inf - inf).
namespace refattn {

// c[n] (16 x 8 tiles, n < 2 NC) += A rows arow.. (16 x D) (B rows brow.. (16 NC x D))^T.
template <typename T, int D, int NC>
__device__ __forceinline__ void mma_abt(float (&c)[2 * NC][4], const T* sA, int arow,
                                        const T* sB, int brow) {
  using L = SmemRows<D>;
  const int lane = threadIdx.x & 31, mat = lane >> 3;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    unsigned a[4];  // rows arow + lane % 16, columns 16 kk + 8 (lane / 16)
    ldmatrix_x4(a, sA + L::offset(arow + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
    for (int n2 = 0; n2 < NC; ++n2) {
      // (rows 0-7, d 0-7), (rows 0-7, d 8-15), (rows 8-15, d 0-7), (rows 8-15, d 8-15)
      unsigned b[4];
      ldmatrix_x4(b, sB + L::offset(brow + 16 * n2 + (mat >> 1) * 8 + (lane & 7),
                                    2 * kk + (mat & 1)));
      Mma<T>::run(c[2 * n2], a, b[0], b[1]);
      Mma<T>::run(c[2 * n2 + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x D) += a (16 x 16, A fragment) times B rows brow.. (16 x D), B read .trans.
template <typename T, int D>
__device__ __forceinline__ void mma_ab(float (&acc)[D / 8][4], const unsigned (&a)[4],
                                       const T* sB, int brow) {
  using L = SmemRows<D>;
  const int lane = threadIdx.x & 31, mat = lane >> 3;
#pragma unroll
  for (int d2 = 0; d2 < D / 16; ++d2) {
    // transposed: (rows 0-7, d 0-7), (rows 8-15, d 0-7), (0-7, d 8-15), (8-15, d 8-15)
    unsigned b[4];
    ldmatrix_x4_trans(b, sB + L::offset(brow + (mat & 1) * 8 + (lane & 7),
                                        2 * d2 + (mat >> 1)));
    Mma<T>::run(acc[2 * d2], a, b[0], b[1]);
    Mma<T>::run(acc[2 * d2 + 1], a, b[2], b[3]);
  }
}

// A fragment (16 x 16) from two 16 x 8 accumulator tiles (columns 0-7 and 8-15).
template <typename T>
__device__ __forceinline__ void pack_a(unsigned (&a)[4], const float (&c0)[4],
                                       const float (&c1)[4]) {
  a[0] = Mma<T>::pack(c0[0], c0[1]);  // row g,     columns 0-7
  a[1] = Mma<T>::pack(c0[2], c0[3]);  // row g + 8, columns 0-7
  a[2] = Mma<T>::pack(c1[0], c1[1]);  // row g,     columns 8-15
  a[3] = Mma<T>::pack(c1[2], c1[3]);  // row g + 8, columns 8-15
}

// dS' of one (row, key) pair from the raw dot products q.k and dO.v.
__device__ __forceinline__ float grad_logit(float dot, float dp, bool keep, float lse2,
                                            float delta, float scale, float softcap,
                                            float& p) {
  float s, slope;
  logit_and_slope(dot, scale, softcap, s, slope);
  p = exp2f((keep ? s * kLog2e : -INFINITY) - lse2);
  return p * (dp - delta) * slope;
}

// lse in log2 units for P = exp2(S log2e - lse2); +inf for a row with nothing kept.
__device__ __forceinline__ float lse_log2(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}
}  // namespace refattn

template <typename T, int D, int BM, int BN, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
flash_bwd_dq_fast(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                  const T* __restrict__ dout, const float* __restrict__ lse,
                  const float* __restrict__ delta, T* __restrict__ dq, int B, int Hq,
                  int Hkv, int N, int M, float scale, float softcap, long long left,
                  long long right, const int* __restrict__ indptr,
                  const int* __restrict__ tile_k, const int* __restrict__ tile_bits,
                  const unsigned* __restrict__ bits, int use_list) {
  using namespace refattn;
  using L = SmemRows<D>;
  constexpr int THREADS = WARPS * 32, NT = BN / 8, DT = D / 8;
  static_assert(BM == 16 * WARPS && BN % 32 == 0 && D % 16 == 0, "tile shape");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * L::ELEMS;
  T* sK = sdO + BM * L::ELEMS;  // 2 stages of BN rows
  T* sV = sK + 2 * BN * L::ELEMS;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (Hq / Hkv);
  const int r0 = qt * BM, wrow = warp * 16;
  const long long offset = (long long)M - N;
  const long long head = ((long long)b * Hq + h) * N;
  const T* kg = k + ((long long)b * Hkv + hk) * M * D;
  const T* vg = v + ((long long)b * Hkv + hk) * M * D;

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

  load_tile<T, D, BM, THREADS>(sQ, q + head * D, r0, N);
  load_tile<T, D, BM, THREADS>(sdO, dout + head * D, r0, N);
  if (count > 0) {
    load_tile<T, D, BN, THREADS>(sK, kg, key_tile(0) * BN, M);
    load_tile<T, D, BN, THREADS>(sV, vg, key_tile(0) * BN, M);
  }
  cp_async_commit();

  float lse2[2], dlt[2];  // rows g and g + 8 of this warp
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = r0 + wrow + g + 8 * r;
    lse2[r] = i < N ? lse_log2(lse[head + i]) : INFINITY;
    dlt[r] = i < N ? delta[head + i] : 0.f;
  }
  float acc[DT][4] = {};
  for (int it = 0; it < count; ++it) {
    const int stage = it & 1;
    if (it + 1 < count) {
      const int nk = key_tile(it + 1) * BN;
      load_tile<T, D, BN, THREADS>(sK + (stage ^ 1) * BN * L::ELEMS, kg, nk, M);
      load_tile<T, D, BN, THREADS>(sV + (stage ^ 1) * BN * L::ELEMS, vg, nk, M);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* tK = sK + stage * BN * L::ELEMS;
    const T* tV = sV + stage * BN * L::ELEMS;
    const int c0 = key_tile(it) * BN;
    const int bit = use_list ? tile_bits[first + it] : -1;
    float s[NT][4] = {}, dp[NT][4] = {};
    mma_abt<T, D, BN / 16>(s, sQ, wrow, tK, 0);    // S = Q K^T
    mma_abt<T, D, BN / 16>(dp, sdO, wrow, tV, 0);  // dP = dO V^T
    // Element e of column tile n: row wrow + g + 8 (e / 2), key c0 + 8 n + 2 tig + e % 2.
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int rl = wrow + g + 8 * (e >> 1), cl = 8 * n + 2 * tig + (e & 1);
        bool keep = r0 + rl < N && c0 + cl < M && in_band(r0 + rl, c0 + cl, offset, left,
                                                          right);
        if (bit >= 0) keep = keep && tile_bit<BM, BN>(bits, bit, rl, cl);
        float p;
        s[n][e] = grad_logit(s[n][e], dp[n][e], keep, lse2[e >> 1], dlt[e >> 1], scale,
                             softcap, p);
      }
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {  // dQ += dS K
      unsigned a[4];
      pack_a<T>(a, s[2 * kk], s[2 * kk + 1]);
      mma_ab<T, D>(acc, a, tK, 16 * kk);
    }
    __syncthreads();  // all warps are done with this stage before it is refilled
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = r0 + wrow + g + 8 * r;
    if (i < N) {
      T* row = dq + (head + i) * D;
#pragma unroll
      for (int t = 0; t < DT; ++t) {
        row[8 * t + 2 * tig] = from_float<T>(acc[t][2 * r]);
        row[8 * t + 2 * tig + 1] = from_float<T>(acc[t][2 * r + 1]);
      }
    }
  }
}

template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(BN / 16 * 32)
flash_bwd_dkdv_fast(const T* __restrict__ q, const T* __restrict__ k,
                    const T* __restrict__ v, const T* __restrict__ dout,
                    const float* __restrict__ lse, const float* __restrict__ delta,
                    T* __restrict__ dk, T* __restrict__ dv, int B, int Hq, int Hkv, int N,
                    int M, float scale, float softcap, long long left, long long right,
                    const int* __restrict__ indptr, const int* __restrict__ tile_q,
                    const int* __restrict__ tile_bits, const unsigned* __restrict__ bits,
                    int use_list) {
  using namespace refattn;
  using L = SmemRows<D>;
  constexpr int THREADS = BN / 16 * 32, DT = D / 8;
  static_assert(BM % 16 == 0 && BN % 32 == 0 && D % 16 == 0, "tile shape");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * L::ELEMS;
  T* sQ = sV + BN * L::ELEMS;    // 2 stages of BM rows
  T* sdO = sQ + 2 * BM * L::ELEMS;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int kt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int group = Hq / Hkv;
  const int c0 = kt * BN, wkey = warp * 16;
  const long long offset = (long long)M - N;
  const long long kvhead = ((long long)b * Hkv + hk) * M;

  int first, count;  // query tiles of one head
  if (use_list) {
    first = indptr[kt];
    count = indptr[kt + 1] - first;
  } else {
    const long long i_lo = max(0LL, c0 - offset - right);
    const long long i_hi = min((long long)N - 1, min(c0 + BN, M) - 1 - offset + left);
    first = (int)(i_lo / BM);
    count = i_lo > i_hi ? 0 : (int)(i_hi / BM) - first + 1;
  }
  const int total = count * group;  // (query head, query tile) pairs, head-major
  auto q_tile = [&](int it) {
    return use_list ? tile_q[first + it % count] : first + it % count;
  };
  auto q_head = [&](int it) { return ((long long)b * Hq + hk * group + it / count) * N; };

  load_tile<T, D, BN, THREADS>(sK, k + kvhead * D, c0, M);
  load_tile<T, D, BN, THREADS>(sV, v + kvhead * D, c0, M);
  if (total > 0) {
    load_tile<T, D, BM, THREADS>(sQ, q + q_head(0) * D, q_tile(0) * BM, N);
    load_tile<T, D, BM, THREADS>(sdO, dout + q_head(0) * D, q_tile(0) * BM, N);
  }
  cp_async_commit();

  float dka[DT][4] = {}, dva[DT][4] = {};

  for (int it = 0; it < total; ++it) {
    const int stage = it & 1;
    if (it + 1 < total) {
      const long long nh = q_head(it + 1);
      const int nr = q_tile(it + 1) * BM;
      load_tile<T, D, BM, THREADS>(sQ + (stage ^ 1) * BM * L::ELEMS, q + nh * D, nr, N);
      load_tile<T, D, BM, THREADS>(sdO + (stage ^ 1) * BM * L::ELEMS, dout + nh * D, nr, N);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* tQ = sQ + stage * BM * L::ELEMS;
    const T* tdO = sdO + stage * BM * L::ELEMS;
    const int qt = q_tile(it), r0 = qt * BM;
    const long long head = q_head(it);
    const int bit = use_list ? tile_bits[first + it % count] : -1;
#pragma unroll 1
    for (int ch = 0; ch < BM / 16; ++ch) {  // 16 query rows at a time
      float st[2][4] = {}, dpt[2][4] = {};
      mma_abt<T, D, 1>(st, sK, wkey, tQ, 16 * ch);    // S^T = K Q^T
      mma_abt<T, D, 1>(dpt, sV, wkey, tdO, 16 * ch);  // dP^T = V dO^T
      // Element e of tile n: key c0 + wkey + g + 8 (e / 2), query r0 + 16 ch + 8 n +
      // 2 tig + e % 2.
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int kl = wkey + g + 8 * (e >> 1), ql = 16 * ch + 8 * n + 2 * tig + (e & 1);
          const int i = r0 + ql;
          bool keep = i < N && c0 + kl < M && in_band(i, c0 + kl, offset, left, right);
          if (bit >= 0) keep = keep && tile_bit<BM, BN>(bits, bit, ql, kl);
          const float l2 = i < N ? lse_log2(lse[head + i]) : INFINITY;
          const float dl = i < N ? delta[head + i] : 0.f;
          float p;
          dpt[n][e] = grad_logit(st[n][e], dpt[n][e], keep, l2, dl, scale, softcap, p);
          st[n][e] = p;
        }
      }
      unsigned a[4];
      pack_a<T>(a, st[0], st[1]);
      mma_ab<T, D>(dva, a, tdO, 16 * ch);  // dV += P^T dO
      pack_a<T>(a, dpt[0], dpt[1]);
      mma_ab<T, D>(dka, a, tQ, 16 * ch);   // dK += dS^T Q
    }
    __syncthreads();  // every warp is done with this Q, dO stage before its refill
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = c0 + wkey + g + 8 * r;
    if (j < M) {
      T* krow = dk + (kvhead + j) * D;
      T* vrow = dv + (kvhead + j) * D;
#pragma unroll
      for (int t = 0; t < DT; ++t) {
        krow[8 * t + 2 * tig] = from_float<T>(dka[t][2 * r]);
        krow[8 * t + 2 * tig + 1] = from_float<T>(dka[t][2 * r + 1]);
        vrow[8 * t + 2 * tig] = from_float<T>(dva[t][2 * r]);
        vrow[8 * t + 2 * tig + 1] = from_float<T>(dva[t][2 * r + 1]);
      }
    }
  }
}

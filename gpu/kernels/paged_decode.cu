// Split-KV decoding over a paged KV cache (flash-decoding, Dao et al. 2023; the vLLM /
// FlashInfer block_table layout), in two kernels:
//
// paged_decode_split<T, D, ROWS>: one block per (split, KV head and row tile, sequence).
//   The keys [0, L_b) of sequence b are cut into num_splits chunks of ceil(L_b / S) keys
//   (chunk s = [s c, min(L_b, (s + 1) c)), empty when s c >= L_b); a block attends the
//   ROWS query rows of its tile to its chunk and writes the normalized partial output
//   o_s = acc / l (float32) and lse_s = m + log l (-inf and 0 for an empty chunk).
//   GQA packing: the rows of KV head hk are every (query token i, query head h) with
//   h / (Hq / Hkv) == hk, row r = i * group + (h % group), so each key is read once for
//   all the query heads sharing it. Query token i of n (bottom-right causal) sees key j
//   iff j <= i + L_b - n (decode: n = 1, every key).
// paged_decode_merge<T, D>: one warp per row, lse = log sum_s e^{lse_s} and
//   o = sum_s e^{lse_s - lse} o_s with the maximum subtracted first
//   (refattn.merge_partials).
//
// Layout (all contiguous): q (B, n, Hq, D); key/value cache (num_blocks, block_size,
// Hkv, D) (NHD); block_table (B, max_blocks) int32; seq_lens (B,) int32; partial o
// (B, n, Hq, S, D) and lse (B, n, Hq, S) float32; out (B, n, Hq, D) in T, lse (B, n, Hq)
// float32. Key j of sequence b is row j % block_size of page block_table[b][j / bs].
//
// Split kernel, 128 threads: each key row is read by LPK lanes, 16 bytes (one chunk) per
// lane per load; the 4 warps hold 4 * 32 / LPK key groups that take consecutive keys and
// each keep an online softmax (m, l, acc) per row; the groups are combined through shared
// memory at the end. Q sits in shared memory as float.
#include "common.cuh"

namespace refattn {

// How a key row of D elements of T is spread over the lanes of a key group.
template <typename T, int D>
struct PagedLanes {
  static constexpr int VEC = 16 / (int)sizeof(T);  // elements per 16-byte chunk
  static constexpr int C = D / VEC;                // chunks per key row
  static constexpr int LPK = C % 32 == 0 ? 32 : C % 16 == 0 ? 16 : C % 8 == 0 ? 8
                           : C % 4 == 0 ? 4 : C % 2 == 0 ? 2 : 1;  // lanes per key
  static constexpr int CH = C / LPK;               // chunks per lane
  static constexpr int E = CH * VEC;               // elements per lane
  static constexpr int GROUPS = 4 * (32 / LPK);    // key groups per block (4 warps)
  // element e of lane `l` (in its group) is element dim(l, e) of the row
  __device__ static __forceinline__ int dim(int l, int e) {
    return (l + LPK * (e / VEC)) * VEC + e % VEC;
  }
};

// 16 bytes at p (16-byte aligned) as VEC floats.
template <typename T, int VEC>
__device__ __forceinline__ void load_chunk(const T* p, float* x) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  T h[VEC];
  memcpy(h, &raw, 16);  // a register-level bit cast
#pragma unroll
  for (int e = 0; e < VEC; ++e) x[e] = to_float(h[e]);
}

}  // namespace refattn

template <typename T, int D, int ROWS>
__global__ void __launch_bounds__(128)
paged_decode_split(const T* __restrict__ q, const T* __restrict__ k_cache,
                   const T* __restrict__ v_cache, const int* __restrict__ block_table,
                   const int* __restrict__ seq_lens, float* __restrict__ part_o,
                   float* __restrict__ part_lse, int Hq, int Hkv, int n, int block_size,
                   int max_blocks, int num_splits, float scale, float softcap) {
  using namespace refattn;
  using P = PagedLanes<T, D>;
  constexpr int E = P::E, VEC = P::VEC, LPK = P::LPK, GROUPS = P::GROUPS;
  static_assert(D % VEC == 0, "head dim must be a multiple of 16 bytes");
  static_assert(ROWS * E <= 64, "per-lane accumulators must stay in registers");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sQ = reinterpret_cast<float*>(smem_raw);  // ROWS x D
  float* sW = sQ + ROWS * D;                        // GROUPS x ROWS: m, then weights
  float* sL = sW + GROUPS * ROWS;                   // GROUPS x ROWS: l
  float* sAcc = sL + GROUPS * ROWS;                 // GROUPS x ROWS x D

  const int split = blockIdx.x, b = blockIdx.z;
  const int group = Hq / Hkv, rows = group * n;
  const int tiles = (rows + ROWS - 1) / ROWS;
  const int hk = blockIdx.y / tiles, r0 = (blockIdx.y % tiles) * ROWS;
  const int len = seq_lens[b];
  const int chunk = (len + num_splits - 1) / num_splits;
  const int k0 = min(len, split * chunk), k1 = min(len, k0 + chunk);

  // Row r of the tile is query token i = (r0 + r) / group of head
  // h = hk * group + (r0 + r) % group, row (b n + i) Hq + h of q, o and lse.
  auto row_of = [&](int r) {
    const int gr = r0 + r;
    return ((long long)b * n + gr / group) * Hq + hk * group + gr % group;
  };
  int last[ROWS];  // valid rows see keys j <= last[r] (bottom-right causal)
#pragma unroll
  for (int r = 0; r < ROWS; ++r) last[r] = r0 + r < rows ? (r0 + r) / group + len - n : -1;
  for (int idx = threadIdx.x; idx < ROWS * D; idx += 128) {
    const int r = idx / D;
    sQ[idx] = r0 + r < rows ? to_float(q[row_of(r) * D + idx % D]) : 0.f;
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, l = lane % LPK;
  const int g = (threadIdx.x >> 5) * (32 / LPK) + lane / LPK;  // this lane's key group
  float m[ROWS], lsum[ROWS], acc[ROWS][E];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = -INFINITY;
    lsum[r] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[r][e] = 0.f;
  }

  // Every lane runs the same number of steps (the shuffles need the whole warp); a group
  // whose key is past the chunk's end only takes part in them.
  for (int base = k0; base < k1; base += GROUPS) {
    const int j = base + g;
    const bool active = j < k1;
    float kx[E], vx[E];
    if (active) {
      const int page = block_table[(long long)b * max_blocks + j / block_size];
      const long long off =
          (((long long)page * block_size + j % block_size) * Hkv + hk) * D;
#pragma unroll
      for (int t = 0; t < P::CH; ++t) {  // K and V loads in flight together
        load_chunk<T, VEC>(k_cache + off + (l + LPK * t) * VEC, kx + t * VEC);
        load_chunk<T, VEC>(v_cache + off + (l + LPK * t) * VEC, vx + t * VEC);
      }
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) kx[e] = vx[e] = 0.f;
    }
    float s[ROWS];
    bool any = false;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) dot += sQ[r * D + P::dim(l, e)] * kx[e];
#pragma unroll
      for (int w = LPK / 2; w > 0; w >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, w);
      s[r] = active && j <= last[r] ? transform_logit(dot, scale, softcap, false)
                                    : -INFINITY;
      any = any || s[r] != -INFINITY;
    }
    if (!any) continue;  // uniform within the key group; no collectives below
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (s[r] == -INFINITY) continue;
      const float m_new = fmaxf(m[r], s[r]);
      const float alpha = expf(m[r] - m_new);  // 0 while nothing was kept (m = -inf)
      const float p = expf(s[r] - m_new);
      lsum[r] = lsum[r] * alpha + p;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[r][e] = acc[r][e] * alpha + p * vx[e];
      m[r] = m_new;
    }
  }

  // Combine the key groups: w_g = e^{m_g - M} / sum_g' e^{m_g' - M} l_g'.
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (l == 0) {
      sW[g * ROWS + r] = m[r];
      sL[g * ROWS + r] = lsum[r];
    }
#pragma unroll
    for (int e = 0; e < E; ++e) sAcc[(g * ROWS + r) * D + P::dim(l, e)] = acc[r][e];
  }
  __syncthreads();
  if (threadIdx.x < ROWS && r0 + threadIdx.x < rows) {
    const int r = threadIdx.x;
    float mx = -INFINITY;
    for (int gg = 0; gg < GROUPS; ++gg) mx = fmaxf(mx, sW[gg * ROWS + r]);
    float total = 0.f;
    for (int gg = 0; gg < GROUPS; ++gg)
      if (mx != -INFINITY) total += expf(sW[gg * ROWS + r] - mx) * sL[gg * ROWS + r];
    const float inv = total > 0.f ? 1.f / total : 0.f;
    for (int gg = 0; gg < GROUPS; ++gg)
      sW[gg * ROWS + r] = total > 0.f ? expf(sW[gg * ROWS + r] - mx) * inv : 0.f;
    part_lse[row_of(r) * num_splits + split] = total > 0.f ? mx + logf(total) : -INFINITY;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < ROWS * D; idx += 128) {
    const int r = idx / D, d = idx % D;
    if (r0 + r >= rows) continue;
    float o = 0.f;
    for (int gg = 0; gg < GROUPS; ++gg)
      o += sW[gg * ROWS + r] * sAcc[(gg * ROWS + r) * D + d];
    part_o[(row_of(r) * num_splits + split) * D + d] = o;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(128)
paged_decode_merge(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                   T* __restrict__ out, float* __restrict__ lse, int rows, int num_splits) {
  using namespace refattn;
  const int lane = threadIdx.x & 31;
  const long long row = (long long)blockIdx.x * 4 + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps; no block-level synchronisation
  const float* pl = part_lse + row * num_splits;
  float mx = -INFINITY;
  for (int s = lane; s < num_splits; s += 32) mx = fmaxf(mx, pl[s]);
#pragma unroll
  for (int w = 16; w > 0; w >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, w));
  const float base = mx == -INFINITY ? 0.f : mx;  // every split empty: weights all 0
  float total = 0.f;
  for (int s = lane; s < num_splits; s += 32) total += expf(pl[s] - base);
#pragma unroll
  for (int w = 16; w > 0; w >>= 1) total += __shfl_xor_sync(0xffffffffu, total, w);
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const float* po = part_o + row * num_splits * D;
  for (int d = lane; d < D; d += 32) {
    float o = 0.f;
    for (int s = 0; s < num_splits; ++s) o += expf(pl[s] - base) * po[(long long)s * D + d];
    out[row * D + d] = from_float<T>(o * inv);
  }
  if (lane == 0) lse[row] = total > 0.f ? base + logf(total) : -INFINITY;
}

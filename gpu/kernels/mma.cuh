// Tensor-core building blocks of the fast kernels (flash_fast.cu's forward, flash_bwd.cu's
// dq and dk/dv kernels): the swizzled shared-memory row layout (SmemRows), cp.async
// (16-byte copies, commit / wait groups), ldmatrix (.x4, plain and .trans), mma.sync
// m16n8k16 (fp16 / bf16 inputs, fp32 accumulation) with the packing of fp32 values into
// A fragments, and the tile loader (load_tile). Only CUDA headers: NVRTC has no host
// standard library. It uses nothing of common.cuh and includes no header of refattn's:
// kernels_spec.source inlines each header at its #include line of the .cu file, once.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace refattn {

// Shared-memory row of D 16-bit values = C chunks of 16 bytes. Chunk c of row r lives at
// chunk position r * STRIDE + swizzle(r, c). ldmatrix reads 8 rows (r = 8a .. 8a+7) of one
// logical chunk per phase; the mapping sends them to 8 different 16-byte bank groups:
//  C % 8 == 0: XOR the low 3 bits of c with r % 8;
//  C == 4:     64-byte rows, XOR c with (r / 2) % 4 (rows r, r+1 differ by 64 bytes);
//  otherwise:  one 16-byte pad chunk per row (odd stride, e.g. D = 96: 13 chunks).
template <int D>
struct SmemRows {
  static constexpr int C = D / 8;
  static constexpr int STRIDE = (C % 8 == 0 || C == 4) ? C : ((C % 2 == 0) ? C + 1 : C);
  static constexpr int ELEMS = STRIDE * 8;  // 16-bit elements per row, padding included
  __device__ static __forceinline__ int offset(int r, int c) {  // in elements
    int sc;
    if (C % 8 == 0) sc = c ^ (r & 7);
    else if (C == 4) sc = c ^ ((r >> 1) & 3);
    else sc = c;
    return (r * STRIDE + sc) * 8;
  }
};

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously (L2 only, .cg); src_bytes < 16 copies that
// many and zero-fills the rest (0: the whole chunk; src must still be a valid address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(src_bytes)
               : "memory");
}
// Close the group of this thread's cp.async issued since the last commit (may be empty).
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Wait until at most PENDING of this thread's committed groups are still in flight (the
// data of the others is in shared memory; other threads' copies need __syncthreads too).
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

// Four 8x8 matrices of 16-bit values from shared memory: lanes 8i .. 8i+7 give the
// addresses of matrix i's rows (16 bytes each); r[i] receives, in lane l, elements
// 2 (l % 4) and 2 (l % 4) + 1 of matrix i's row l / 4 (of its transpose with .trans).
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

// D (16x8, f32) += A (16x16, row) * B (16x8, col). With g = lane / 4, t = lane % 4: a[0]
// holds A's row g, columns 2t, 2t+1; a[1] row g+8; a[2], a[3] the same rows, columns +8;
// b0 B's rows (k) 2t, 2t+1 of column g, b1 rows +8; d[0], d[1] D's row g, columns 2t,
// 2t+1, d[2], d[3] row g+8. pack(lo, hi): two values as a 16-bit pair of an A fragment.
template <typename T> struct Mma;
template <> struct Mma<__half> {
  __device__ static __forceinline__ void run(float (&d)[4], const unsigned (&a)[4],
                                             unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static __forceinline__ unsigned pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // lo -> low 16 bits (lower column)
    return *reinterpret_cast<unsigned*>(&h);
  }
};
template <> struct Mma<__nv_bfloat16> {
  __device__ static __forceinline__ void run(float (&d)[4], const unsigned (&a)[4],
                                             unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static __forceinline__ unsigned pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
  }
};

// Copy `ROWS` rows of D values starting at global row `row0` (of `limit` rows) into a
// swizzled shared tile; rows at or beyond `limit` are zero-filled (src-size 0, with a
// valid dummy source address).
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int row0, int limit) {
  using L = SmemRows<D>;
#pragma unroll
  for (int idx = threadIdx.x; idx < ROWS * L::C; idx += THREADS) {
    const int r = idx / L::C, c = idx % L::C;
    const bool valid = row0 + r < limit;
    const T* g = valid ? src + ((long long)(row0 + r) * D + c * 8) : src;
    cp_async16(dst + L::offset(r, c), g, valid ? 16 : 0);
  }
}

}  // namespace refattn

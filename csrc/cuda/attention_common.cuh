// Shared by attention_forward.cu and attention_backward.cu (flash attention on tensor cores, head dim 64,
// float16/bfloat16): tile geometry, the XOR-swizzled shared-memory layout, cp.async tile loads, ldmatrix, the
// mma.sync m16n8k16 wrappers and the fragment-level products both passes are built from.
// Fragments: a warp's 16 x 8 accumulator tile acc[4] holds rows g = lane >> 2 and g + 8, columns 2 * (lane & 3)
// + 0/1 (elements e: row g + 8 * (e >> 1), column + (e & 1)); A fragments (16 x 16) hold 4 registers of 2 halves.
#pragma once

#include "common.cuh"

// cp.async, ldmatrix and mma.sync with bfloat16 need sm_80: say so instead of a ptxas error on older targets.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the cuda attention kernels need sm_80+ (cp.async, ldmatrix, bf16 mma.sync): set TORCH_CUDA_ARCH_LIST >= 8.0"
#endif

namespace cct {

constexpr int kD = 64;       // head dim
constexpr int kBlock = 64;   // query rows (forward) / keys (backward) per block, and the inner block size
constexpr int kThreads = 128;
constexpr int kTile = kBlock * kD;  // elements of one 64 x 64 shared-memory tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Element offset of (row, col) in a 64 x 64 tile whose 16-byte chunks are XOR-swizzled by (row & 7).
__device__ __forceinline__ int swz(int row, int col) { return row * kD + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// Rows [row0, row0 + 64) of a (rows x 64) matrix with row stride ld into a swizzled tile; rows >= n are zero-filled
// (past the sequence, or past its real keys: padded V rows must be 0, not garbage, since 0 * NaN = NaN).
template <typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t ld, int row0, int n) {
  for (int i = threadIdx.x; i < kBlock * 8; i += kThreads) {
    const int r = i >> 3, ch = i & 7;
    const bool ok = row0 + r < n;
    const T* g = ok ? src + (int64_t)(row0 + r) * ld + ch * 8 : src;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(tile + swz(r, ch * 8))), "l"(g),
                 "r"(ok ? 16 : 0));
  }
}
// Closes the group of this thread's cp.async copies issued since the last commit (an empty group is fine).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// Accumulator tiles acc[nt] (16 x 8 each, 2K of them: 16 x 16K) -> A fragments (16 x 16 each, K of them) of the
// same matrix: the m16n8 C layout of tiles 2kk, 2kk+1 is the m16k16 A layout of k-step kk.
template <typename T, int K>
__device__ __forceinline__ void acc_to_a(const float (&acc)[2 * K][4], uint32_t (&a)[K][4]) {
#pragma unroll
  for (int nt = 0; nt < 2 * K; ++nt) {
    a[nt >> 1][(nt & 1) * 2 + 0] = Mma<T>::pack(acc[nt][0], acc[nt][1]);
    a[nt >> 1][(nt & 1) * 2 + 1] = Mma<T>::pack(acc[nt][2], acc[nt][3]);
  }
}

// acc (16 x 8*kTiles) += A (16 x 64, as 4 k-step fragments) * B^T where B is rows [row0, row0 + 8*kTiles) of a
// swizzled 64 x 64 tile read by rows (B row = output column): C[i][j] = sum_k A[i][k] B[row0 + j][k].
template <typename T, int kTiles>
__device__ __forceinline__ void mma_abt(float (&acc)[kTiles][4], const uint32_t (&a)[4][4], const T* tile, int lane,
                                        int row0 = 0) {
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
    uint32_t b[4];
    ldsm_x4(b, tile + swz(row0 + nt * 8 + (lane & 7), (lane >> 3) * 8));
    Mma<T>::run(acc[nt], a[0], b[0], b[1]);
    Mma<T>::run(acc[nt], a[1], b[2], b[3]);
    ldsm_x4(b, tile + swz(row0 + nt * 8 + (lane & 7), 32 + (lane >> 3) * 8));
    Mma<T>::run(acc[nt], a[2], b[0], b[1]);
    Mma<T>::run(acc[nt], a[3], b[2], b[3]);
  }
}

// acc (16 x 64) += A (16 x 16*kSteps as kSteps k-step fragments) * B where B is rows [k0, k0 + 16*kSteps) of a
// swizzled 64 x 64 tile (row = k).
template <typename T, int kSteps>
__device__ __forceinline__ void mma_ab(float (&acc)[8][4], const uint32_t (&a)[kSteps][4], const T* tile, int lane,
                                       int k0 = 0) {
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk)
#pragma unroll
    for (int dp = 0; dp < 4; ++dp) {
      uint32_t b[4];
      ldsm_x4_t(b, tile + swz(k0 + kk * 16 + (lane & 15), dp * 16 + (lane >> 4) * 8));
      Mma<T>::run(acc[2 * dp], a[kk], b[0], b[1]);
      Mma<T>::run(acc[2 * dp + 1], a[kk], b[2], b[3]);
    }
}

// A fragments of rows [row0, row0 + 16) x 64 of a swizzled tile.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4][4], const T* tile, int row0, int lane) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) ldsm_x4(a[kk], tile + swz(row0 + (lane & 15), kk * 16 + (lane >> 4) * 8));
}

__device__ __forceinline__ void zero(float (&acc)[8][4]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// Zeros into rows [row0, row0 + 64) of a (rows x 64) matrix with row stride ld, rows >= n left alone: the output of
// a sequence without real keys, the dK/dV of padded keys. 16-byte stores (dst and ld 16-byte aligned).
template <typename T>
__device__ __forceinline__ void zero_tile(T* dst, int64_t ld, int row0, int n) {
  for (int i = threadIdx.x; i < kBlock * 8; i += kThreads) {
    const int r = i >> 3, ch = i & 7;
    if (row0 + r < n) *reinterpret_cast<uint4*>(dst + (int64_t)(row0 + r) * ld + ch * 8) = make_uint4(0, 0, 0, 0);
  }
}

}  // namespace cct

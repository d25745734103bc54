// Flash attention on tensor cores (mma.sync.m16n8k16, float32 accumulation) for head dim 64, float16/bfloat16,
// reading the packed qkv (B, N, 3*H*64) in place and writing merged heads (B, N, H*64). No dropout (the Python
// adapter reports dropout_p > 0 as unsupported, so "auto" uses another backend in training).
//
// Forward (FlashAttention-2 layout): a block of 4 warps owns 64 query rows (16 per warp, Q fragments in registers),
// streams 64-key blocks of K and V through shared memory (cp.async, XOR-swizzled 16-byte chunks so ldmatrix is
// bank-conflict free), keeps S = Q K^T in registers, applies an online softmax in the exp2 domain and feeds P
// straight from the accumulator registers into P V. lse (B, H, N) float32 = natural-log logsumexp of scale * q.k.
// Backward: delta = rowsum(dO * O) first; then a block owns 64 keys (16 per warp) and loops over 64-query blocks,
// each in two halves of 32 queries (so that it fits 168 registers: 3 CTAs/SM): S^T = K Q^T, P^T = exp(S^T - lse),
// dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q (all in registers), and dQ += dS K through
// shared memory into a float32 accumulator (16-byte vector atomics on sm_90; converted at the end).
// Loads are double-buffered: the cp.async copies of the next K/V block (forward) or Q/dO block (backward) are issued
// before the current one is computed, and waited for with cp.async.wait_group 1 (all but the newest group done).
#include <atomic>

#include "common.cuh"
#include "kernels.h"

// cp.async, ldmatrix and mma.sync with bfloat16 need sm_80: say so instead of a ptxas error on older targets.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "attention.cu needs sm_80+ (cp.async, ldmatrix, bf16 mma.sync): set TORCH_CUDA_ARCH_LIST >= 8.0"
#endif

namespace cct {
namespace {

constexpr int kD = 64;       // head dim
constexpr int kBlock = 64;   // query rows (forward) / keys (backward) per block, and the inner block size
constexpr int kThreads = 128;
constexpr int kTile = kBlock * kD;  // elements of one 64 x 64 shared-memory tile
// Backward CTAs per SM asked of ptxas: 3 means <= 168 registers, which fits sm_80 and sm_90 without spills; the
// 1536-thread SMs of sm_86/sm_87/sm_89 get 2 (at 168 registers their build spills 40 bytes).
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 870 || __CUDA_ARCH__ == 890)
constexpr int kBwdMinBlocks = 2;
#else
constexpr int kBwdMinBlocks = 3;
#endif
// Backward shared memory: K, V, dS^T and two stages of Q and dO (7 tiles), two stages of lse and delta.
constexpr int kBwdSmem = 7 * kTile * 2 + 4 * kBlock * 4;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Element offset of (row, col) in a 64 x 64 tile whose 16-byte chunks are XOR-swizzled by (row & 7).
__device__ __forceinline__ int swz(int row, int col) { return row * kD + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// Rows [row0, row0 + 64) of a (rows x 64) matrix with row stride ld into a swizzled tile; rows >= n are zero-filled.
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

// p[0..3] += v as one vector reduction (REDG.E.ADD.F32x4) on sm_90; four scalar ones before. p 16-byte aligned.
__device__ __forceinline__ void red_add4(float* p, float4 v) {
#if __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), v);
#else
  atomicAdd(p, v.x);
  atomicAdd(p + 1, v.y);
  atomicAdd(p + 2, v.z);
  atomicAdd(p + 3, v.w);
#endif
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

template <typename T>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const T* __restrict__ qkv, T* __restrict__ out,
                                                            float* __restrict__ lse, int N, int H, float scale_log2) {
  __shared__ __align__(128) T sQ[kBlock * kD];
  __shared__ __align__(128) T sK[2][kBlock * kD];  // two stages: block j is computed while block j+1 loads
  __shared__ __align__(128) T sV[2][kBlock * kD];
  const int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = blockIdx.x * kBlock;
  const int D = H * kD;
  const int64_t ld = 3 * (int64_t)D;
  const T* base = qkv + (int64_t)b * N * ld + h * kD;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;

  load_tile(sQ, base, ld, q0, N);
  cp_async_commit();  // group: Q
  load_tile(sK[0], base + D, ld, 0, N);
  load_tile(sV[0], base + 2 * D, ld, 0, N);
  cp_async_commit();  // group: K/V block 0
  cp_async_wait<1>();  // Q has landed (block 0 may still be in flight)
  __syncthreads();
  uint32_t qf[4][4];
  load_a(qf, sQ, warp * 16, lane);

  float o[8][4];
  zero(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  for (int k0 = 0, stage = 0; k0 < N; k0 += kBlock, stage ^= 1) {
    __syncthreads();  // every warp is done with the other stage (block j-1) before it is overwritten
    if (k0 + kBlock < N) {
      load_tile(sK[stage ^ 1], base + D, ld, k0 + kBlock, N);
      load_tile(sV[stage ^ 1], base + 2 * D, ld, k0 + kBlock, N);
    }
    cp_async_commit();  // group: block j+1 (empty after the last block, so that wait<1> below always means block j)
    cp_async_wait<1>();
    __syncthreads();  // block j from every thread's copies is visible
    const T* tK = sK[stage];
    const T* tV = sV[stage];
    float s[8][4];
    zero(s);
    mma_abt(s, qf, tK, lane);
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + nt * 8 + t4 * 2 + (e & 1);
        s[nt][e] = key < N ? s[nt][e] * scale_log2 : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the 4 threads of a quad share a row
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    }
    // mx is finite (key k0 < N is valid in every block) unless the scores are NaN, which then propagate
    const float alpha[2] = {exp2f(m[0] - mx[0]), exp2f(m[1] - mx[1])};
    m[0] = mx[0];
    m[1] = mx[1];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = exp2f(s[nt][e] - m[e >> 1]);
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      rs[0] += s[nt][0] + s[nt][1];
      rs[1] += s[nt][2] + s[nt][3];
    }
    l[0] = l[0] * alpha[0] + rs[0];  // per-thread partial sums; alpha is uniform across the quad
    l[1] = l[1] * alpha[1] + rs[1];
#pragma unroll
    for (int dt = 0; dt < 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }
    uint32_t pf[4][4];
    acc_to_a<T, 4>(s, pf);
    mma_ab(o, pf, tV, lane);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + warp * 16 + g + r * 8;
    if (row >= N) continue;
    const float inv = 1.f / l[r];
    T* dst = out + ((int64_t)b * N + row) * D + h * kD + t4 * 2;
#pragma unroll
    for (int dt = 0; dt < 8; ++dt)
      *reinterpret_cast<uint32_t*>(dst + dt * 8) = Mma<T>::pack(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    if (t4 == 0) lse[(int64_t)bh * N + row] = (m[r] + log2f(l[r])) * kLn2;
  }
}

// delta[b, h, n] = sum_c dO[b, n, h, c] * O[b, n, h, c]; one warp per (b, n, h) row of 64.
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_bwd_delta_kernel(const T* __restrict__ gout,
                                                                  const T* __restrict__ out,
                                                                  float* __restrict__ delta, int64_t rows, int N,
                                                                  int H) {
  const int64_t r = (int64_t)blockIdx.x * (kThreads / 32) + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t off = r * kD + lane * 2;
  float s = ld_f(gout + off) * ld_f(out + off) + ld_f(gout + off + 1) * ld_f(out + off + 1);
  s = warp_sum(s);
  if (lane == 0) {
    const int64_t h = r % H, bn = r / H, b = bn / N, n = bn % N;
    delta[(b * H + h) * N + n] = s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kBwdMinBlocks)
    attn_bwd_kernel(const T* __restrict__ gout, const T* __restrict__ qkv, const float* __restrict__ lse,
                    const float* __restrict__ delta, T* __restrict__ gqkv, float* __restrict__ dq_accum, int N, int H,
                    float scale, float scale_log2) {
  // Dynamic shared memory (kBwdSmem bytes): K, V, two stages of Q and dO, dS^T (row = key, column = query), then
  // two stages of lse (log2 units) and delta.
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kTile;
  T* sQs = sV + kTile;          // [2][kTile]
  T* sdOs = sQs + 2 * kTile;    // [2][kTile]
  T* sdS = sdOs + 2 * kTile;
  float* sLs = reinterpret_cast<float*>(sdS + kTile);  // [2][kBlock]
  float* sDeltas = sLs + 2 * kBlock;                     // [2][kBlock]
  const int bh = blockIdx.y, b = bh / H, h = bh % H, k0 = blockIdx.x * kBlock;
  const int D = H * kD;
  const int64_t ld = 3 * (int64_t)D;
  const T* base = qkv + (int64_t)b * N * ld + h * kD;
  const T* gbase = gout + (int64_t)b * N * D + h * kD;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int key0 = k0 + warp * 16 + g;  // this thread's accumulator rows: key0 and key0 + 8
  // Stage `st` of query block q0: Q and dO by cp.async (the caller commits), lse and delta by plain loads.
  auto load_query_block = [&](int st, int q0) {
    load_tile(sQs + st * kTile, base, ld, q0, N);
    load_tile(sdOs + st * kTile, gbase, D, q0, N);
    if (threadIdx.x < kBlock) {
      const int q = q0 + threadIdx.x;
      sLs[st * kBlock + threadIdx.x] = q < N ? lse[(int64_t)bh * N + q] * kLog2e : INFINITY;  // padded: P = 0
      sDeltas[st * kBlock + threadIdx.x] = q < N ? delta[(int64_t)bh * N + q] : 0.f;
    }
  };

  load_tile(sK, base + D, ld, k0, N);
  load_tile(sV, base + 2 * D, ld, k0, N);
  cp_async_commit();  // group: K, V
  load_query_block(0, 0);
  cp_async_commit();  // group: query block 0

  float dv[8][4], dk[8][4];
  zero(dv);
  zero(dk);
  for (int q0 = 0, stage = 0; q0 < N; q0 += kBlock, stage ^= 1) {
    __syncthreads();  // the previous iteration is done with the other stage and with sdS
    if (q0 + kBlock < N) load_query_block(stage ^ 1, q0 + kBlock);
    cp_async_commit();  // group: query block j+1 (empty after the last one: wait<1> always means block j)
    cp_async_wait<1>();
    __syncthreads();  // block j (every thread's copies, lse and delta) is visible
    const T* sQ = sQs + stage * kTile;
    const T* sdO = sdOs + stage * kTile;
    const float* sL = sLs + stage * kBlock;
    const float* sDelta = sDeltas + stage * kBlock;

    // Per half of 32 queries (16 accumulators per intermediate live instead of 32, so that the kernel fits 168
    // registers: 3 CTAs/SM; not unrolled, so the halves do not overlap). Rows of every accumulator: keys key0,
    // key0 + 8; columns: the half's queries.
#pragma unroll 1
    for (int half = 0; half < 2; ++half) {
      const int qh = half * 32;  // the half's first query within the block
      float st[4][4];  // S^T = K Q^T, then P^T = exp(S^T - lse)
      float dpt[4][4];  // dP^T = V dO^T, then dS^T = P^T (dP^T - delta)
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
      {
        uint32_t kf[4][4];  // K and V fragments are re-read from shared memory rather than held (registers)
        load_a(kf, sK, warp * 16, lane);
        mma_abt(st, kf, sQ, lane, qh);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int q = qh + i * 8 + t4 * 2 + (e & 1);
          const bool key_ok = key0 + (e >> 1) * 8 < N;
          st[i][e] = key_ok ? exp2f(st[i][e] * scale_log2 - sL[q]) : 0.f;
        }
      {
        uint32_t pf[2][4];
        acc_to_a<T, 2>(st, pf);
        mma_ab(dv, pf, sdO, lane, qh);  // dV += P^T dO
      }
      {
        uint32_t vf[4][4];
        load_a(vf, sV, warp * 16, lane);
        mma_abt(dpt, vf, sdO, lane, qh);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[i][e] = st[i][e] * (dpt[i][e] - sDelta[qh + i * 8 + t4 * 2 + (e & 1)]);
      uint32_t dsf[2][4];
      acc_to_a<T, 2>(dpt, dsf);
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // dS^T to shared memory for dQ
        const int q = qh + i * 8 + t4 * 2, r = warp * 16 + g;
        *reinterpret_cast<uint32_t*>(sdS + swz(r, q)) = dsf[i >> 1][(i & 1) * 2];
        *reinterpret_cast<uint32_t*>(sdS + swz(r + 8, q)) = dsf[i >> 1][(i & 1) * 2 + 1];
      }
      mma_ab(dk, dsf, sQ, lane, qh);  // dK += dS^T Q
    }
    __syncthreads();  // sdS is complete
    // dQ rows q0 + warp*16 .. +15: dS (queries x 64 keys, read transposed from sdS) times K (64 keys x 64), in two
    // halves of 32 columns (16 accumulators live instead of 32: the backward fits 168 registers, 3 CTAs/SM).
    // Lanes t4 and t4^1 hold columns 2*t4.. of rows g and g+8: after one exchange the even lane holds 4 adjacent
    // columns of row g, the odd lane 4 of row g+8, added with one 16-byte vector reduction each (8 per query block).
    const bool odd = t4 & 1;
    const int q = q0 + warp * 16 + g + (odd ? 8 : 0);
    float* dst = dq_accum + ((int64_t)b * N + q) * D + h * kD + (t4 & 2) * 2;
#pragma unroll 1
    for (int half = 0; half < 2; ++half) {
      float dq[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[4];
        ldsm_x4_t(a, sdS + swz(kk * 16 + (lane & 7) + (lane >> 4) * 8, warp * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
        for (int dp = 0; dp < 2; ++dp) {
          uint32_t bk[4];
          ldsm_x4_t(bk, sK + swz(kk * 16 + (lane & 15), (half * 2 + dp) * 16 + (lane >> 4) * 8));
          Mma<T>::run(dq[2 * dp], a, bk[0], bk[1]);
          Mma<T>::run(dq[2 * dp + 1], a, bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int dt = 0; dt < 4; ++dt) {
        const float x0 = __shfl_xor_sync(0xffffffffu, odd ? dq[dt][0] : dq[dt][2], 1);
        const float x1 = __shfl_xor_sync(0xffffffffu, odd ? dq[dt][1] : dq[dt][3], 1);
        const float4 v = odd ? make_float4(x0, x1, dq[dt][2], dq[dt][3]) : make_float4(dq[dt][0], dq[dt][1], x0, x1);
        if (q < N) red_add4(dst + (half * 4 + dt) * 8, v);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + r * 8;
    if (key >= N) continue;
    T* dst = gqkv + ((int64_t)b * N + key) * ld + h * kD + t4 * 2;
#pragma unroll
    for (int dt = 0; dt < 8; ++dt) {
      *reinterpret_cast<uint32_t*>(dst + D + dt * 8) = Mma<T>::pack(dk[dt][2 * r] * scale, dk[dt][2 * r + 1] * scale);
      *reinterpret_cast<uint32_t*>(dst + 2 * D + dt * 8) = Mma<T>::pack(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  }
}

// grad_qkv[b, n, 0:D] = scale * dq_accum[b, n, :]
template <typename T>
__global__ void __launch_bounds__(256) attn_bwd_dq_kernel(const float* __restrict__ dq_accum, T* __restrict__ gqkv,
                                                         int64_t total, int D, float scale) {
  const int64_t i = (int64_t)blockIdx.x * 256 + threadIdx.x;
  if (i >= total) return;
  const int64_t row = i / D, c = i % D;
  st_f(gqkv + row * 3 * D + c, dq_accum[i] * scale);
}

template <typename T>
cudaError_t fwd(const void* qkv, void* out, float* lse, int64_t B, int64_t N, int64_t H, float scale,
                cudaStream_t stream) {
  const dim3 grid((unsigned)((N + kBlock - 1) / kBlock), (unsigned)(B * H));
  attn_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(qkv), static_cast<T*>(out), lse, (int)N,
                                                     (int)H, scale * kLog2e);
  return cudaGetLastError();
}

// The backward's 57 KB of shared memory is above the 48 KB a launch gets without opting in. The opt-in is a
// per-device attribute of the function: set once per device (not per call, so that a CUDA-graph capture of the
// backward sees only launches); a benign race sets it twice.
template <typename T>
cudaError_t opt_in_bwd_smem() {
  static std::atomic<uint64_t> done_devices{0};  // bit d: device d has opted in (devices >= 64: every call)
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 64 && ((done_devices.load() >> device) & 1)) return cudaSuccess;
  err = cudaFuncSetAttribute(attn_bwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBwdSmem);
  if (err == cudaSuccess && device < 64) done_devices.fetch_or(uint64_t{1} << device);
  return err;
}

template <typename T>
cudaError_t bwd(const void* gout, const void* qkv, const void* out, const float* lse, void* gqkv, float* delta,
                float* dq_accum, int64_t B, int64_t N, int64_t H, float scale, cudaStream_t stream) {
  const int64_t rows = B * N * H;
  attn_bwd_delta_kernel<T><<<(unsigned)((rows + 3) / 4), kThreads, 0, stream>>>(
      static_cast<const T*>(gout), static_cast<const T*>(out), delta, rows, (int)N, (int)H);
  const dim3 grid((unsigned)((N + kBlock - 1) / kBlock), (unsigned)(B * H));
  const cudaError_t opt_in = opt_in_bwd_smem<T>();
  if (opt_in != cudaSuccess) return opt_in;
  attn_bwd_kernel<T><<<grid, kThreads, kBwdSmem, stream>>>(static_cast<const T*>(gout), static_cast<const T*>(qkv), lse,
                                                           delta, static_cast<T*>(gqkv), dq_accum, (int)N, (int)H,
                                                           scale, scale * kLog2e);
  const int64_t total = rows * kD;
  attn_bwd_dq_kernel<T><<<(unsigned)((total + 255) / 256), 256, 0, stream>>>(dq_accum, static_cast<T*>(gqkv), total,
                                                                            (int)(H * kD), scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_forward_cuda_launch(int dtype, const void* qkv, void* out, float* lse, int64_t B, int64_t N,
                                          int64_t H, float scale, cudaStream_t stream) {
  if (B * N * H == 0) return cudaSuccess;
  switch (dtype) {
    case kF16: return fwd<__half>(qkv, out, lse, B, N, H, scale, stream);
    case kBF16: return fwd<__nv_bfloat16>(qkv, out, lse, B, N, H, scale, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t attention_backward_cuda_launch(int dtype, const void* grad_out, const void* qkv, const void* out,
                                           const float* lse, void* grad_qkv, float* delta, float* dq_accum, int64_t B,
                                           int64_t N, int64_t H, float scale, cudaStream_t stream) {
  if (B * N * H == 0) return cudaSuccess;
  switch (dtype) {
    case kF16: return bwd<__half>(grad_out, qkv, out, lse, grad_qkv, delta, dq_accum, B, N, H, scale, stream);
    case kBF16:
      return bwd<__nv_bfloat16>(grad_out, qkv, out, lse, grad_qkv, delta, dq_accum, B, N, H, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cct

// Flash attention on tensor cores (mma.sync.m16n8k16, float32 accumulation) for head dim 64, float16/bfloat16,
// reading the packed qkv (B, N, 3*H*64) in place and writing merged heads (B, N, H*64). No dropout (the Python
// adapter reports dropout_p > 0 as unsupported, so "auto" uses another backend in training).
//
// Forward (FlashAttention-2 layout): a block of 4 warps owns 64 query rows (16 per warp, Q fragments in registers),
// streams 64-key blocks of K and V through shared memory (cp.async, XOR-swizzled 16-byte chunks so ldmatrix is
// bank-conflict free), keeps S = Q K^T in registers, applies an online softmax in the exp2 domain and feeds P
// straight from the accumulator registers into P V. lse (B, H, N) float32 = natural-log logsumexp of scale * q.k.
// Backward: delta = rowsum(dO * O) first; then a block owns 64 keys (16 per warp) and loops over 64-query blocks:
// S^T = K Q^T, P^T = exp(S^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q (all in
// registers), and dQ += dS K through shared memory into a float32 accumulator (atomicAdd; converted at the end).
#include "common.cuh"
#include "kernels.h"

namespace cct {
namespace {

constexpr int kD = 64;       // head dim
constexpr int kBlock = 64;   // query rows (forward) / keys (backward) per block, and the inner block size
constexpr int kThreads = 128;
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
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
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

// Accumulator tiles acc[nt] (16 x 8 each, 8 of them: 16 x 64) -> A fragments (16 x 16 each, 4 of them) of the same
// 16 x 64 matrix: the m16n8 C layout of tiles 2kk, 2kk+1 is the m16k16 A layout of k-step kk.
template <typename T>
__device__ __forceinline__ void acc_to_a(const float (&acc)[8][4], uint32_t (&a)[4][4]) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    a[nt >> 1][(nt & 1) * 2 + 0] = Mma<T>::pack(acc[nt][0], acc[nt][1]);
    a[nt >> 1][(nt & 1) * 2 + 1] = Mma<T>::pack(acc[nt][2], acc[nt][3]);
  }
}

// acc (16 x 64) += A (16 x 64, as 4 k-step fragments) * B^T where B (64 rows x 64) is a swizzled tile read by rows
// (B row = output column): C[i][j] = sum_k A[i][k] B[j][k].
template <typename T>
__device__ __forceinline__ void mma_abt(float (&acc)[8][4], const uint32_t (&a)[4][4], const T* tile, int lane) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    uint32_t b[4];
    ldsm_x4(b, tile + swz(nt * 8 + (lane & 7), (lane >> 3) * 8));
    Mma<T>::run(acc[nt], a[0], b[0], b[1]);
    Mma<T>::run(acc[nt], a[1], b[2], b[3]);
    ldsm_x4(b, tile + swz(nt * 8 + (lane & 7), 32 + (lane >> 3) * 8));
    Mma<T>::run(acc[nt], a[2], b[0], b[1]);
    Mma<T>::run(acc[nt], a[3], b[2], b[3]);
  }
}

// acc (16 x 64) += A (16 x 64 as 4 k-step fragments) * B where B (64 x 64) is a swizzled tile (row = k).
template <typename T>
__device__ __forceinline__ void mma_ab(float (&acc)[8][4], const uint32_t (&a)[4][4], const T* tile, int lane) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int dp = 0; dp < 4; ++dp) {
      uint32_t b[4];
      ldsm_x4_t(b, tile + swz(kk * 16 + (lane & 15), dp * 16 + (lane >> 4) * 8));
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
  __shared__ __align__(128) T sK[kBlock * kD];
  __shared__ __align__(128) T sV[kBlock * kD];
  const int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = blockIdx.x * kBlock;
  const int D = H * kD;
  const int64_t ld = 3 * (int64_t)D;
  const T* base = qkv + (int64_t)b * N * ld + h * kD;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;

  load_tile(sQ, base, ld, q0, N);
  cp_async_wait_all();
  __syncthreads();
  uint32_t qf[4][4];
  load_a(qf, sQ, warp * 16, lane);

  float o[8][4];
  zero(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  for (int k0 = 0; k0 < N; k0 += kBlock) {
    __syncthreads();  // all warps are done with the previous K/V block
    load_tile(sK, base + D, ld, k0, N);
    load_tile(sV, base + 2 * D, ld, k0, N);
    cp_async_wait_all();
    __syncthreads();
    float s[8][4];
    zero(s);
    mma_abt(s, qf, sK, lane);
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
    // mx is finite: key k0 < N is valid in every block
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
    acc_to_a<T>(s, pf);
    mma_ab(o, pf, sV, lane);
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
__global__ void __launch_bounds__(kThreads) attn_bwd_kernel(const T* __restrict__ gout, const T* __restrict__ qkv,
                                                            const float* __restrict__ lse,
                                                            const float* __restrict__ delta, T* __restrict__ gqkv,
                                                            float* __restrict__ dq_accum, int N, int H, float scale,
                                                            float scale_log2) {
  __shared__ __align__(128) T sK[kBlock * kD];
  __shared__ __align__(128) T sV[kBlock * kD];
  __shared__ __align__(128) T sQ[kBlock * kD];
  __shared__ __align__(128) T sdO[kBlock * kD];
  __shared__ __align__(128) T sdS[kBlock * kD];  // dS^T: row = key, column = query
  __shared__ float sL[kBlock], sDelta[kBlock];
  const int bh = blockIdx.y, b = bh / H, h = bh % H, k0 = blockIdx.x * kBlock;
  const int D = H * kD;
  const int64_t ld = 3 * (int64_t)D;
  const T* base = qkv + (int64_t)b * N * ld + h * kD;
  const T* gbase = gout + (int64_t)b * N * D + h * kD;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int key0 = k0 + warp * 16 + g;  // this thread's accumulator rows: key0 and key0 + 8

  load_tile(sK, base + D, ld, k0, N);
  load_tile(sV, base + 2 * D, ld, k0, N);
  cp_async_wait_all();
  __syncthreads();
  uint32_t kf[4][4];  // K rows stay in registers; V fragments are re-read per query block (register pressure)
  load_a(kf, sK, warp * 16, lane);

  float dv[8][4], dk[8][4];
  zero(dv);
  zero(dk);
  for (int q0 = 0; q0 < N; q0 += kBlock) {
    __syncthreads();  // the previous iteration is done with sQ, sdO, sdS, sL, sDelta
    load_tile(sQ, base, ld, q0, N);
    load_tile(sdO, gbase, D, q0, N);
    if (threadIdx.x < kBlock) {
      const int q = q0 + threadIdx.x;
      sL[threadIdx.x] = q < N ? lse[(int64_t)bh * N + q] * kLog2e : INFINITY;  // +inf: padded queries get P = 0
      sDelta[threadIdx.x] = q < N ? delta[(int64_t)bh * N + q] : 0.f;
    }
    cp_async_wait_all();
    __syncthreads();

    float st[8][4];  // S^T, then P^T (rows: keys key0, key0 + 8; columns: queries)
    zero(st);
    mma_abt(st, kf, sQ, lane);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int q = nt * 8 + t4 * 2 + (e & 1);
        const bool key_ok = key0 + (e >> 1) * 8 < N;
        st[nt][e] = key_ok ? exp2f(st[nt][e] * scale_log2 - sL[q]) : 0.f;
      }
    {
      uint32_t pf[4][4];
      acc_to_a<T>(st, pf);
      mma_ab(dv, pf, sdO, lane);  // dV += P^T dO
    }
    float dpt[8][4];  // dP^T = V dO^T, then dS^T
    zero(dpt);
    {
      uint32_t vf[4][4];
      load_a(vf, sV, warp * 16, lane);
      mma_abt(dpt, vf, sdO, lane);
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int q = nt * 8 + t4 * 2 + (e & 1);
        dpt[nt][e] = st[nt][e] * (dpt[nt][e] - sDelta[q]);
      }
    {
      uint32_t dsf[4][4];
      acc_to_a<T>(dpt, dsf);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {  // dS^T to shared memory for dQ
        const int q = nt * 8 + t4 * 2, r = warp * 16 + g;
        *reinterpret_cast<uint32_t*>(sdS + swz(r, q)) = dsf[nt >> 1][(nt & 1) * 2];
        *reinterpret_cast<uint32_t*>(sdS + swz(r + 8, q)) = dsf[nt >> 1][(nt & 1) * 2 + 1];
      }
      mma_ab(dk, dsf, sQ, lane);  // dK += dS^T Q
    }
    __syncthreads();  // sdS is complete
    // dQ rows q0 + warp*16 .. +15: dS (queries x 64 keys, read transposed from sdS) times K (64 keys x 64).
    float dq[8][4];
    zero(dq);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4];
      ldsm_x4_t(a, sdS + swz(kk * 16 + (lane & 7) + (lane >> 4) * 8, warp * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
      for (int dp = 0; dp < 4; ++dp) {
        uint32_t bk[4];
        ldsm_x4_t(bk, sK + swz(kk * 16 + (lane & 15), dp * 16 + (lane >> 4) * 8));
        Mma<T>::run(dq[2 * dp], a, bk[0], bk[1]);
        Mma<T>::run(dq[2 * dp + 1], a, bk[2], bk[3]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int q = q0 + warp * 16 + g + r * 8;
      if (q >= N) continue;
      float* dst = dq_accum + ((int64_t)b * N + q) * D + h * kD + t4 * 2;
#pragma unroll
      for (int dt = 0; dt < 8; ++dt) {
        atomicAdd(dst + dt * 8, dq[dt][2 * r]);
        atomicAdd(dst + dt * 8 + 1, dq[dt][2 * r + 1]);
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

template <typename T>
cudaError_t bwd(const void* gout, const void* qkv, const void* out, const float* lse, void* gqkv, float* delta,
                float* dq_accum, int64_t B, int64_t N, int64_t H, float scale, cudaStream_t stream) {
  const int64_t rows = B * N * H;
  attn_bwd_delta_kernel<T><<<(unsigned)((rows + 3) / 4), kThreads, 0, stream>>>(
      static_cast<const T*>(gout), static_cast<const T*>(out), delta, rows, (int)N, (int)H);
  const dim3 grid((unsigned)((N + kBlock - 1) / kBlock), (unsigned)(B * H));
  attn_bwd_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(gout), static_cast<const T*>(qkv), lse,
                                                     delta, static_cast<T*>(gqkv), dq_accum, (int)N, (int)H, scale,
                                                     scale * kLog2e);
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

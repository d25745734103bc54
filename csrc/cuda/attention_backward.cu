// Flash attention backward on tensor cores (mma.sync.m16n8k16, float32 accumulation) for head dim 64,
// float16/bfloat16: grad_qkv (B, N, 3*H*64) from grad_out and out (B, N, H*64), qkv and the forward's lse.
// delta = rowsum(dO * O) first; then a block owns 64 keys (16 per warp) and loops over 64-query blocks, each in two
// halves of 32 queries (so that it fits 168 registers: 3 CTAs/SM): S^T = K Q^T, P^T = exp(S^T - lse),
// dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q (all in registers), and dQ += dS K through
// shared memory into a float32 accumulator (16-byte vector atomics on sm_90; converted at the end).
// The cp.async copies of the next Q/dO block are issued before the current one is computed (double buffering).
// Key padding (lengths, may be nullptr; L = lengths[b] real keys): a key block at or past L writes zero dK/dV and
// returns at once (no query loop: a batch pays for its real keys); in the block holding key L the keys >= L get
// P = 0 (K/V rows zero-filled), hence zero dK/dV and no share of dQ. Every query (padded too) still runs: its
// output came from the real keys. L = 0: every key block returns early, and dQ stays the zero-filled accumulator.
#include <atomic>

#include "attention_common.cuh"
#include "kernels.h"

namespace cct {
namespace {

// Backward CTAs per SM asked of ptxas: 3 means <= 168 registers, which fits sm_80 and sm_90 without spills; the
// 1536-thread SMs of sm_86/sm_87/sm_89 get 2 (at 168 registers their build spills 40 bytes).
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 870 || __CUDA_ARCH__ == 890)
constexpr int kBwdMinBlocks = 2;
#else
constexpr int kBwdMinBlocks = 3;
#endif
// Backward shared memory: K, V, dS^T and two stages of Q and dO (7 tiles), two stages of lse and delta.
constexpr int kBwdSmem = 7 * kTile * 2 + 4 * kBlock * 4;

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
                    const float* __restrict__ delta, const int64_t* __restrict__ lengths, T* __restrict__ gqkv,
                    float* __restrict__ dq_accum, int N, int H, float scale, float scale_log2) {
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
  const int L = real_tokens(lengths, b, N);
  if (k0 >= L) {  // padded keys only: no probability reaches them, so zero dK, dV and nothing to add to dQ
    zero_tile(gqkv + (int64_t)b * N * ld + D + h * kD, ld, k0, N);
    zero_tile(gqkv + (int64_t)b * N * ld + 2 * D + h * kD, ld, k0, N);
    return;
  }
  // Padded keys get P = exp2(s - lse - inf) = 0. Two floats, not a test of key < L in the loop: that kept one
  // more value live and spilled 8 bytes at the 168 registers of 3 CTAs/SM.
  const float pad[2] = {key0 < L ? 0.f : INFINITY, key0 + 8 < L ? 0.f : INFINITY};
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

  load_tile(sK, base + D, ld, k0, L);  // keys >= L zero-filled
  load_tile(sV, base + 2 * D, ld, k0, L);
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
          st[i][e] = exp2f(st[i][e] * scale_log2 - sL[q] - pad[e >> 1]);
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
    if (key >= N) continue;  // keys in [L, N) write the zeros they accumulated (P = 0, V rows 0)
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
cudaError_t bwd(const void* gout, const void* qkv, const void* out, const float* lse, const int64_t* lengths,
                void* gqkv, float* delta, float* dq_accum, int64_t B, int64_t N, int64_t H, float scale,
                cudaStream_t stream) {
  const int64_t rows = B * N * H;
  attn_bwd_delta_kernel<T><<<(unsigned)((rows + 3) / 4), kThreads, 0, stream>>>(
      static_cast<const T*>(gout), static_cast<const T*>(out), delta, rows, (int)N, (int)H);
  const dim3 grid((unsigned)((N + kBlock - 1) / kBlock), (unsigned)(B * H));
  const cudaError_t opt_in = opt_in_bwd_smem<T>();
  if (opt_in != cudaSuccess) return opt_in;
  attn_bwd_kernel<T><<<grid, kThreads, kBwdSmem, stream>>>(static_cast<const T*>(gout), static_cast<const T*>(qkv), lse,
                                                           delta, lengths, static_cast<T*>(gqkv), dq_accum, (int)N,
                                                           (int)H, scale, scale * kLog2e);
  const int64_t total = rows * kD;
  attn_bwd_dq_kernel<T><<<(unsigned)((total + 255) / 256), 256, 0, stream>>>(dq_accum, static_cast<T*>(gqkv), total,
                                                                            (int)(H * kD), scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_backward_cuda_launch(int dtype, const void* grad_out, const void* qkv, const void* out,
                                           const float* lse, const int64_t* lengths, void* grad_qkv, float* delta,
                                           float* dq_accum, int64_t B, int64_t N, int64_t H, float scale,
                                           cudaStream_t stream) {
  if (B * N * H == 0) return cudaSuccess;
  switch (dtype) {
    case kF16: return bwd<__half>(grad_out, qkv, out, lse, lengths, grad_qkv, delta, dq_accum, B, N, H, scale, stream);
    case kBF16:
      return bwd<__nv_bfloat16>(grad_out, qkv, out, lse, lengths, grad_qkv, delta, dq_accum, B, N, H, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cct

// Flash attention forward on tensor cores (mma.sync.m16n8k16, float32 accumulation) for head dim 64,
// float16/bfloat16, reading the packed qkv (B, N, 3*H*64) in place and writing merged heads (B, N, H*64). No dropout
// (the Python adapter reports dropout_p > 0 as unsupported, so "auto" uses another backend in training).
// FlashAttention-2 layout: a block of 4 warps owns 64 query rows (16 per warp, Q fragments in registers), streams
// 64-key blocks of K and V through shared memory (cp.async, XOR-swizzled 16-byte chunks so ldmatrix is bank-conflict
// free), keeps S = Q K^T in registers, applies an online softmax in the exp2 domain and feeds P straight from the
// accumulator registers into P V. lse (B, H, N) float32 = natural-log logsumexp of scale * q.k.
// The copies of the next K/V block are issued before the current one is computed (double buffering) and waited for
// with cp.async.wait_group 1 (all but the newest group done).
// Key padding (lengths, may be nullptr): sequence b has L = lengths[b] real keys (a prefix) and every query row,
// padded ones too, attends to those only: the key loop stops at L (key blocks past it are neither loaded nor
// computed: a batch pays for its real keys) and the last block masks keys >= L. L = 0: out 0, lse -inf.
#include "attention_common.cuh"
#include "kernels.h"

namespace cct {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const T* __restrict__ qkv, T* __restrict__ out,
                                                            float* __restrict__ lse,
                                                            const int64_t* __restrict__ lengths, int N, int H,
                                                            float scale_log2) {
  __shared__ __align__(128) T sQ[kBlock * kD];
  __shared__ __align__(128) T sK[2][kBlock * kD];  // two stages: block j is computed while block j+1 loads
  __shared__ __align__(128) T sV[2][kBlock * kD];
  const int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = blockIdx.x * kBlock;
  const int D = H * kD;
  const int64_t ld = 3 * (int64_t)D;
  const T* base = qkv + (int64_t)b * N * ld + h * kD;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int L = real_tokens(lengths, b, N);
  if (L == 0) {  // no real key: zeros, and lse = -inf marks the rows (the backward writes them zero gradients)
    zero_tile(out + (int64_t)b * N * D + h * kD, D, q0, N);
    if (threadIdx.x < kBlock && q0 + (int)threadIdx.x < N) lse[(int64_t)bh * N + q0 + threadIdx.x] = -INFINITY;
    return;
  }

  load_tile(sQ, base, ld, q0, N);
  cp_async_commit();  // group: Q
  load_tile(sK[0], base + D, ld, 0, L);
  load_tile(sV[0], base + 2 * D, ld, 0, L);
  cp_async_commit();  // group: K/V block 0
  cp_async_wait<1>();  // Q has landed (block 0 may still be in flight)
  __syncthreads();
  uint32_t qf[4][4];
  load_a(qf, sQ, warp * 16, lane);

  float o[8][4];
  zero(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  for (int k0 = 0, stage = 0; k0 < L; k0 += kBlock, stage ^= 1) {
    __syncthreads();  // every warp is done with the other stage (block j-1) before it is overwritten
    if (k0 + kBlock < L) {
      load_tile(sK[stage ^ 1], base + D, ld, k0 + kBlock, L);
      load_tile(sV[stage ^ 1], base + 2 * D, ld, k0 + kBlock, L);
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
        s[nt][e] = key < L ? s[nt][e] * scale_log2 : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the 4 threads of a quad share a row
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    }
    // mx is finite (key k0 < L is real in every block) unless the scores are NaN, which then propagate
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

template <typename T>
cudaError_t fwd(const void* qkv, void* out, float* lse, const int64_t* lengths, int64_t B, int64_t N, int64_t H,
                float scale, cudaStream_t stream) {
  const dim3 grid((unsigned)((N + kBlock - 1) / kBlock), (unsigned)(B * H));
  attn_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(qkv), static_cast<T*>(out), lse, lengths,
                                                     (int)N, (int)H, scale * kLog2e);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_forward_cuda_launch(int dtype, const void* qkv, void* out, float* lse, const int64_t* lengths,
                                          int64_t B, int64_t N, int64_t H, float scale, cudaStream_t stream) {
  if (B * N * H == 0) return cudaSuccess;
  switch (dtype) {
    case kF16: return fwd<__half>(qkv, out, lse, lengths, B, N, H, scale, stream);
    case kBF16: return fwd<__nv_bfloat16>(qkv, out, lse, lengths, B, N, H, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cct

// SeqPool on CUDA: one block of 256 threads per batch row. x (B, N, D) float32/float16/bfloat16, float32 math.
// Forward: each warp computes scores s_n = x_n . w + bias for its rows into shared memory (N <= kSeqPoolMaxN floats),
// the block reduces max and sum (lse), then threads own columns d and sum p_n x[n, d] (coalesced along D).
// Backward: the same score pass also forms g . x_n; then grad_x[n, d] = p_n g[d] + ds_n w[d] with
// ds_n = p_n (g . x_n - g . out), and per-row partial grad_w[d] = sum_n ds_n x[n, d], grad_b = sum_n ds_n.
#include "common.cuh"
#include "kernels.h"

namespace cct {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) seqpool_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                               const T* __restrict__ bias, T* __restrict__ out,
                                                               float* __restrict__ lse, int N, int D) {
  extern __shared__ float scores[];  // N floats
  __shared__ float scratch[32];
  const int b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* xb = x + (int64_t)b * N * D;
  const float b0 = ld_f(bias);
  float mx = -INFINITY;
  for (int n = warp; n < N; n += kThreads / 32) {
    float s = 0.f;
    for (int k = lane; k < D; k += 32) s += ld_f(xb + (int64_t)n * D + k) * ld_f(w + k);
    s = warp_sum(s) + b0;
    if (lane == 0) scores[n] = s;
    mx = fmaxf(mx, s);
  }
  mx = block_reduce<kThreads, true>(mx, scratch);  // also makes `scores` visible to all threads
  float sum = 0.f;
  for (int n = threadIdx.x; n < N; n += kThreads) {
    const float e = __expf(scores[n] - mx);
    scores[n] = e;
    sum += e;
  }
  sum = block_reduce<kThreads, false>(sum, scratch);
  const float inv = 1.f / sum;
  for (int k = threadIdx.x; k < D; k += kThreads) {
    float acc = 0.f;
    for (int n = 0; n < N; ++n) acc += scores[n] * ld_f(xb + (int64_t)n * D + k);
    st_f(out + (int64_t)b * D + k, acc * inv);
  }
  if (threadIdx.x == 0) lse[b] = mx + logf(sum);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) seqpool_bwd_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                                               const T* __restrict__ w, const T* __restrict__ bias,
                                                               const T* __restrict__ out,
                                                               const float* __restrict__ lse, T* __restrict__ gx,
                                                               float* __restrict__ gw_rows,
                                                               float* __restrict__ gb_rows, int N, int D) {
  extern __shared__ float smem[];  // p (N floats), ds (N floats)
  float* p = smem;
  float* ds = smem + N;
  __shared__ float scratch[32];
  const int b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* xb = x + (int64_t)b * N * D;
  const T* gb = g + (int64_t)b * D;
  float gout = 0.f;
  for (int k = threadIdx.x; k < D; k += kThreads) gout += ld_f(gb + k) * ld_f(out + (int64_t)b * D + k);
  gout = block_reduce<kThreads, false>(gout, scratch);
  const float b0 = ld_f(bias), l = lse[b];
  float dbias = 0.f;
  for (int n = warp; n < N; n += kThreads / 32) {
    float s = 0.f, gxn = 0.f;
    for (int k = lane; k < D; k += 32) {
      const float v = ld_f(xb + (int64_t)n * D + k);
      s += v * ld_f(w + k);
      gxn += v * ld_f(gb + k);
    }
    s = warp_sum(s);
    gxn = warp_sum(gxn);
    const float pn = __expf(s + b0 - l), dsn = pn * (gxn - gout);
    if (lane == 0) {
      p[n] = pn;
      ds[n] = dsn;
    }
    dbias += dsn;
  }
  __syncthreads();
  for (int k = threadIdx.x; k < D; k += kThreads) {
    const float gk = ld_f(gb + k), wk = ld_f(w + k);
    float acc = 0.f;
    for (int n = 0; n < N; ++n) {
      const int64_t off = (int64_t)n * D + k;
      st_f(gx + (int64_t)b * N * D + off, p[n] * gk + ds[n] * wk);
      acc += ds[n] * ld_f(xb + off);
    }
    gw_rows[(int64_t)b * D + k] = acc;
  }
  // every lane of a warp holds that warp's ds sum: count it once per warp
  dbias = block_reduce<kThreads, false>(lane == 0 ? dbias : 0.f, scratch);
  if (threadIdx.x == 0) gb_rows[b] = dbias;
}

template <typename T>
cudaError_t launch_fwd(const void* x, const void* w, const void* bias, void* out, float* lse, int64_t B, int64_t N,
                       int64_t D, cudaStream_t stream) {
  const size_t smem = N * sizeof(float);
  if (smem > 48 * 1024) cudaFuncSetAttribute(seqpool_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  seqpool_fwd_kernel<T><<<(unsigned)B, kThreads, smem, stream>>>(static_cast<const T*>(x), static_cast<const T*>(w),
                                                                  static_cast<const T*>(bias), static_cast<T*>(out),
                                                                  lse, (int)N, (int)D);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const void* g, const void* x, const void* w, const void* bias, const void* out,
                       const float* lse, void* gx, float* gw_rows, float* gb_rows, int64_t B, int64_t N, int64_t D,
                       cudaStream_t stream) {
  const size_t smem = 2 * N * sizeof(float);
  if (smem > 48 * 1024) cudaFuncSetAttribute(seqpool_bwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  seqpool_bwd_kernel<T><<<(unsigned)B, kThreads, smem, stream>>>(
      static_cast<const T*>(g), static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(bias),
      static_cast<const T*>(out), lse, static_cast<T*>(gx), gw_rows, gb_rows, (int)N, (int)D);
  return cudaGetLastError();
}

}  // namespace

cudaError_t seqpool_forward_cuda_launch(int dtype, const void* x, const void* weight, const void* bias, void* out,
                                        float* lse, int64_t B, int64_t N, int64_t D, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (N > kSeqPoolMaxN) return cudaErrorInvalidValue;
  switch (dtype) {
    case kF32: return launch_fwd<float>(x, weight, bias, out, lse, B, N, D, stream);
    case kF16: return launch_fwd<__half>(x, weight, bias, out, lse, B, N, D, stream);
    case kBF16: return launch_fwd<__nv_bfloat16>(x, weight, bias, out, lse, B, N, D, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t seqpool_backward_cuda_launch(int dtype, const void* grad_out, const void* x, const void* weight,
                                         const void* bias, const void* out, const float* lse, void* grad_x,
                                         float* grad_weight_rows, float* grad_bias_rows, int64_t B, int64_t N,
                                         int64_t D, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (N > kSeqPoolMaxN) return cudaErrorInvalidValue;
  switch (dtype) {
    case kF32:
      return launch_bwd<float>(grad_out, x, weight, bias, out, lse, grad_x, grad_weight_rows, grad_bias_rows, B, N, D,
                               stream);
    case kF16:
      return launch_bwd<__half>(grad_out, x, weight, bias, out, lse, grad_x, grad_weight_rows, grad_bias_rows, B, N,
                                D, stream);
    case kBF16:
      return launch_bwd<__nv_bfloat16>(grad_out, x, weight, bias, out, lse, grad_x, grad_weight_rows, grad_bias_rows,
                                       B, N, D, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cct

// Tokenizer epilogue on CUDA (after the cuDNN convolution that csrc/ops.cpp runs channels-last): one thread per
// pooled element, channel fastest, so channels-last reads and token writes are coalesced. Forward: max of ReLU(y)
// over the pool window (first maximum, NaN propagates, as torch's max_pool2d) + int8 pool_index. Backward: each
// conv-output element gathers grad_out from the windows whose recorded argmax it is (no atomics).
// float32/float16/bfloat16; any strides for y/gy and out (given as [b, c, h, w] element strides).
#include "common.cuh"
#include "kernels.h"

namespace cct {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) pool_fwd_kernel(const T* __restrict__ y, Strides4 ys, T* __restrict__ out,
                                                            int8_t* __restrict__ index, Strides4 os, PoolGeometry g,
                                                            bool relu, int64_t total) {
  const int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (i >= total) return;
  const int64_t c = i % g.C, pw = (i / g.C) % g.Wp, ph = (i / (g.C * g.Wp)) % g.Hp, b = i / (g.C * g.Wp * g.Hp);
  const T* plane = y + b * ys.b + c * ys.c;
  float m = -INFINITY;
  int8_t ix = 0;
  for (int kh = 0; kh < g.pk; ++kh) {
    const int64_t h = ph * g.ps - g.pp + kh;
    if (h < 0 || h >= g.Ho) continue;
    for (int kw = 0; kw < g.pk; ++kw) {
      const int64_t w = pw * g.ps - g.pp + kw;
      if (w < 0 || w >= g.Wo) continue;
      float v = ld_f(plane + h * ys.h + w * ys.w);
      if (relu && v < 0.f) v = 0.f;
      if (v > m || v != v) {
        m = v;
        ix = (int8_t)(kh * g.pk + kw);
      }
    }
  }
  const int64_t off = b * os.b + c * os.c + ph * os.h + pw * os.w;
  st_f(out + off, m);
  index[off] = ix;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pool_bwd_kernel(const T* __restrict__ gout, const T* __restrict__ out,
                                                            const int8_t* __restrict__ index, Strides4 os,
                                                            T* __restrict__ gy, Strides4 ys, PoolGeometry g, bool relu,
                                                            int64_t total) {
  const int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (i >= total) return;
  const int64_t c = i % g.C, w = (i / g.C) % g.Wo, h = (i / (g.C * g.Wo)) % g.Ho, b = i / (g.C * g.Wo * g.Ho);
  int64_t ph0, ph1, pw0, pw1;
  window_range(h, g.pk, g.ps, g.pp, g.Hp, ph0, ph1);
  window_range(w, g.pk, g.ps, g.pp, g.Wp, pw0, pw1);
  float acc = 0.f;
  for (int64_t ph = ph0; ph <= ph1; ++ph)
    for (int64_t pw = pw0; pw <= pw1; ++pw) {
      const int64_t off = b * os.b + c * os.c + ph * os.h + pw * os.w;
      const int8_t code = (int8_t)((h + g.pp - ph * g.ps) * g.pk + (w + g.pp - pw * g.ps));
      if (index[off] == code && (!relu || relu_passes(ld_f(out + off)))) acc += ld_f(gout + off);
    }
  st_f(gy + b * ys.b + c * ys.c + h * ys.h + w * ys.w, acc);  // same rule as gather_grad_cl in cpu/tokenize.cpp
}

template <typename T>
cudaError_t fwd(const void* y, Strides4 ys, void* out, int8_t* index, Strides4 os, PoolGeometry g, bool relu,
                cudaStream_t stream) {
  const int64_t total = g.B * g.C * g.Hp * g.Wp;
  if (total == 0) return cudaSuccess;
  pool_fwd_kernel<T><<<(unsigned)((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(y), ys, static_cast<T*>(out), index, os, g, relu, total);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd(const void* gout, const void* out, const int8_t* index, Strides4 os, void* gy, Strides4 ys,
                PoolGeometry g, bool relu, cudaStream_t stream) {
  const int64_t total = g.B * g.C * g.Ho * g.Wo;
  if (total == 0) return cudaSuccess;
  pool_bwd_kernel<T><<<(unsigned)((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      static_cast<const T*>(gout), static_cast<const T*>(out), index, os, static_cast<T*>(gy), ys, g, relu, total);
  return cudaGetLastError();
}

}  // namespace

cudaError_t pool_forward_cuda_launch(int dtype, const void* y, Strides4 ys, void* out, int8_t* index, Strides4 os,
                                     PoolGeometry g, bool relu, cudaStream_t stream) {
  switch (dtype) {
    case kF32: return fwd<float>(y, ys, out, index, os, g, relu, stream);
    case kF16: return fwd<__half>(y, ys, out, index, os, g, relu, stream);
    case kBF16: return fwd<__nv_bfloat16>(y, ys, out, index, os, g, relu, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t pool_backward_cuda_launch(int dtype, const void* grad_out, const void* out, const int8_t* index,
                                      Strides4 os, void* gy, Strides4 ys, PoolGeometry g, bool relu,
                                      cudaStream_t stream) {
  switch (dtype) {
    case kF32: return bwd<float>(grad_out, out, index, os, gy, ys, g, relu, stream);
    case kF16: return bwd<__half>(grad_out, out, index, os, gy, ys, g, relu, stream);
    case kBF16: return bwd<__nv_bfloat16>(grad_out, out, index, os, gy, ys, g, relu, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cct

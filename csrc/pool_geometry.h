// Geometry of the tokenizer's max pool, shared by the CPU kernels and the CUDA kernels (no torch headers here, so
// csrc/cuda/*.cu compile with plain nvcc).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define CCT_HD __host__ __device__ __forceinline__
#else
#define CCT_HD inline
#endif

namespace cct {

// Conv output (B, C, Ho, Wo) pooled by a pk x pk window, stride ps, padding pp, into (B, C, Hp, Wp).
struct PoolGeometry {
  int64_t B, C, Ho, Wo, Hp, Wp, pk, ps, pp;
};

// Element strides of a pooled tensor addressed as [b, c, ph, pw] (channel-fastest, i.e. tokens or channels-last
// NCHW: c = 1, w = C, h = Wp*C; row-major NCHW: w = 1).
struct Strides4 {
  int64_t b, c, h, w;
};

CCT_HD Strides4 pooled_strides(PoolGeometry g, bool channel_fastest) {
  if (channel_fastest) return Strides4{g.Hp * g.Wp * g.C, 1, g.Wp * g.C, g.C};
  return Strides4{g.C * g.Hp * g.Wp, g.Hp * g.Wp, g.Wp, 1};
}

// The pooled indices p whose windows contain conv position i: p0 <= p <= p1 (empty when p0 > p1).
CCT_HD void window_range(int64_t i, int64_t k, int64_t s, int64_t pad, int64_t P, int64_t& p0, int64_t& p1) {
  const int64_t hi = i + pad;                  // window p covers [p*s - pad, p*s - pad + k - 1]
  p0 = hi - k + 1 <= 0 ? 0 : (hi - k + s) / s;  // ceil((hi - k + 1) / s) for a positive numerator
  p1 = hi / s;
  if (p1 > P - 1) p1 = P - 1;
}

// Whether ReLU's backward passes the gradient of an output: unless it is <= 0, so a NaN output passes it, as
// torch's threshold_backward does (written `!(out <= 0)`, not `out > 0`, which would block NaN).
CCT_HD bool relu_passes(float out) { return !(out <= 0.f); }

}  // namespace cct

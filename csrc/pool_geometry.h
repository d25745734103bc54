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

// Element strides of a pooled tensor addressed as [b, c, ph, pw] (tokens: c = 1, w = C, h = Wp*C; NCHW: w = 1).
struct Strides4 {
  int64_t b, c, h, w;
};

CCT_HD Strides4 pooled_strides(PoolGeometry g, bool to_tokens) {
  if (to_tokens) return Strides4{g.Hp * g.Wp * g.C, 1, g.Wp * g.C, g.C};
  return Strides4{g.C * g.Hp * g.Wp, g.Hp * g.Wp, g.Wp, 1};
}

// The pooled indices p whose windows contain conv position i: p0 <= p <= p1 (empty when p0 > p1).
CCT_HD void window_range(int64_t i, int64_t k, int64_t s, int64_t pad, int64_t P, int64_t& p0, int64_t& p1) {
  const int64_t hi = i + pad;                  // window p covers [p*s - pad, p*s - pad + k - 1]
  p0 = hi - k + 1 <= 0 ? 0 : (hi - k + s) / s;  // ceil((hi - k + 1) / s) for a positive numerator
  p1 = hi / s;
  if (p1 > P - 1) p1 = P - 1;
}

// Max of ReLU(y) (or y) over window (ph, pw) of one contiguous Ho x Wo plane; ix = kh*k+kw of the first maximum.
template <typename T>
CCT_HD void pool_window_max(const T* plane, PoolGeometry g, int64_t ph, int64_t pw, bool relu, float& m,
                            int8_t& ix) {
  for (int64_t kh = 0; kh < g.pk; ++kh) {
    const int64_t h = ph * g.ps - g.pp + kh;
    if (h < 0 || h >= g.Ho) continue;
    for (int64_t kw = 0; kw < g.pk; ++kw) {
      const int64_t w = pw * g.ps - g.pp + kw;
      if (w < 0 || w >= g.Wo) continue;
      float v = static_cast<float>(plane[h * g.Wo + w]);
      if (relu && v < 0.f) v = 0.f;
      if (v > m || v != v) {  // first maximum wins; NaN propagates, as torch's max_pool2d
        m = v;
        ix = (int8_t)(kh * g.pk + kw);
      }
    }
  }
}

// Whether ReLU's backward passes the gradient of an output: unless it is <= 0, so a NaN output passes it, as
// torch's threshold_backward does (written `!(out <= 0)`, not `out > 0`, which would block NaN).
CCT_HD bool relu_passes(float out) { return !(out <= 0.f); }

// d loss / d y[b, c, h, w]: the sum of grad_out over the windows whose recorded argmax is (h, w); a window whose
// maximum was clipped by ReLU (out == 0) passes nothing; one whose maximum is NaN passes its gradient.
template <typename T>
CCT_HD float gather_grad(const T* gout, const T* out, const int8_t* index, PoolGeometry g, Strides4 os,
                         int64_t b, int64_t c, int64_t h, int64_t w, bool relu) {
  int64_t ph0, ph1, pw0, pw1;
  window_range(h, g.pk, g.ps, g.pp, g.Hp, ph0, ph1);
  window_range(w, g.pk, g.ps, g.pp, g.Wp, pw0, pw1);
  float acc = 0.f;
  for (int64_t ph = ph0; ph <= ph1; ++ph)
    for (int64_t pw = pw0; pw <= pw1; ++pw) {
      const int64_t off = b * os.b + c * os.c + ph * os.h + pw * os.w;
      const int8_t code = (int8_t)((h + g.pp - ph * g.ps) * g.pk + (w + g.pp - pw * g.ps));
      if (index[off] == code && (!relu || relu_passes(static_cast<float>(out[off]))))
        acc += static_cast<float>(gout[off]);
    }
  return acc;
}

}  // namespace cct

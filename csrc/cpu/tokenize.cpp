// One tokenizer stage on CPU: convolution through ATen (oneDNN), then ONE fused pass for ReLU + max pool + the
// output layout (tokens (B, Hp*Wp, C) or NCHW (B, C, Hp, Wp)) that also writes the int8 pool_index (row-major
// offset kh*k+kw of the first maximum in the window, as torch's max_pool2d picks it). Backward: the conv-output
// gradient gathered from pool_index (each conv position sums the windows whose argmax it is; ReLU'd-away maxima
// pass nothing), then at::convolution_backward.
// The convolution runs channels-last when C_in <= 4 (oneDNN is ~2x faster there on the RGB stem; NCHW is faster
// for 64 -> 384, measured on this AVX2 machine); the epilogue reads either layout (vectorised over C when
// channels-last). Dtypes: float32, float16, bfloat16 (float compare; exact, no rounding in the epilogue).
#include "common.h"
#include "cpu_ops.h"
#include "../tokenize_common.h"

namespace cct {
namespace {

template <typename T>
void pool_forward_cl(const T* y, T* out, int8_t* index, const PoolGeometry& g, const Strides4& os, bool relu) {
  // y channels-last contiguous: y[b, h, w, c]. One task per (b, pooled row).
  const int64_t C = g.C;
  at::parallel_for(0, g.B * g.Hp, grain_for(g.Wp * C * g.pk * g.pk), [&](int64_t begin, int64_t end) {
    // The window's argmax code is tracked as a float so that the whole loop is one float vector type (int8 lanes
    // beside float lanes keep GCC from vectorising it).
    std::vector<float> mx(C), ix(C);
    const float lo = relu ? 0.f : -INFINITY;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / g.Hp, ph = t % g.Hp;
      for (int64_t pw = 0; pw < g.Wp; ++pw) {
        std::fill(mx.begin(), mx.end(), -INFINITY);
        std::fill(ix.begin(), ix.end(), 0.f);
        for (int64_t kh = 0; kh < g.pk; ++kh) {
          const int64_t h = ph * g.ps - g.pp + kh;
          if (h < 0 || h >= g.Ho) continue;
          for (int64_t kw = 0; kw < g.pk; ++kw) {
            const int64_t w = pw * g.ps - g.pp + kw;
            if (w < 0 || w >= g.Wo) continue;
            const T* __restrict src = y + ((b * g.Ho + h) * g.Wo + w) * C;
            const float code = (float)(kh * g.pk + kw);
            float* __restrict m = mx.data();
            float* __restrict ixp = ix.data();
            // Written without && / || and with the ReLU as a clamp to `lo`: GCC vectorises only this form.
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              float v = to_f(src[c]);
              v = v < lo ? lo : v;
              const float mc = m[c];
              const bool take = (v > mc) | (v != v);  // first maximum wins; NaN propagates like max_pool2d
              m[c] = take ? v : mc;
              ixp[c] = take ? code : ixp[c];
            }
          }
        }
        T* o = out + b * os.b + ph * os.h + pw * os.w;
        int8_t* id = index + b * os.b + ph * os.h + pw * os.w;
        if (os.c == 1) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            o[c] = static_cast<T>(mx[c]);
            id[c] = (int8_t)ix[c];
          }
        } else {
          for (int64_t c = 0; c < C; ++c) {
            o[c * os.c] = static_cast<T>(mx[c]);
            id[c * os.c] = (int8_t)ix[c];
          }
        }
      }
    }
  });
}

template <typename T>
void pool_forward_nchw(const T* y, T* out, int8_t* index, const PoolGeometry& g, const Strides4& os, bool relu) {
  // y NCHW contiguous. One task per (b, c) plane.
  at::parallel_for(0, g.B * g.C, grain_for(g.Hp * g.Wp * g.pk * g.pk), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / g.C, c = t % g.C;
      const T* plane = y + t * g.Ho * g.Wo;
      for (int64_t ph = 0; ph < g.Hp; ++ph)
        for (int64_t pw = 0; pw < g.Wp; ++pw) {
          float m = -INFINITY;
          int8_t ix = 0;
          pool_window_max(plane, g, ph, pw, relu, m, ix);
          const int64_t off = b * os.b + c * os.c + ph * os.h + pw * os.w;
          out[off] = static_cast<T>(m);
          index[off] = ix;
        }
    }
  });
}

template <typename T>
void pool_backward_cl(const T* gout, const T* out, const int8_t* index, T* gy, const PoolGeometry& g,
                      const Strides4& os, bool relu) {
  // gy channels-last contiguous. One task per (b, conv row h): each position gathers from its <= ceil(k/s)^2 windows.
  const int64_t C = g.C;
  at::parallel_for(0, g.B * g.Ho, grain_for(g.Wo * C * 4), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / g.Ho, h = t % g.Ho;
      int64_t ph0, ph1;
      window_range(h, g.pk, g.ps, g.pp, g.Hp, ph0, ph1);
      for (int64_t w = 0; w < g.Wo; ++w) {
        std::fill(acc.begin(), acc.end(), 0.f);
        int64_t pw0, pw1;
        window_range(w, g.pk, g.ps, g.pp, g.Wp, pw0, pw1);
        for (int64_t ph = ph0; ph <= ph1; ++ph)
          for (int64_t pw = pw0; pw <= pw1; ++pw) {
            const int8_t code = (int8_t)((h + g.pp - ph * g.ps) * g.pk + (w + g.pp - pw * g.ps));
            const int64_t off = b * os.b + ph * os.h + pw * os.w;
            const T* go = gout + off;
            const T* o = out + off;
            const int8_t* id = index + off;
            float* __restrict a = acc.data();
            if (os.c == 1) {
              const float codef = code;
              const bool norelu = !relu;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) {  // float compare and bitwise ops: the form GCC vectorises
                const bool hit = ((float)id[c] == codef) & ((to_f(o[c]) > 0.f) | norelu);
                a[c] += hit ? to_f(go[c]) : 0.f;
              }
            } else {
              for (int64_t c = 0; c < C; ++c) {
                const int64_t k = c * os.c;
                const bool hit = id[k] == code && (!relu || to_f(o[k]) > 0.f);
                a[c] += hit ? to_f(go[k]) : 0.f;
              }
            }
          }
        T* dst = gy + ((b * g.Ho + h) * g.Wo + w) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<T>(acc[c]);
      }
    }
  });
}

template <typename T>
void pool_backward_nchw(const T* gout, const T* out, const int8_t* index, T* gy, const PoolGeometry& g,
                        const Strides4& os, bool relu) {
  at::parallel_for(0, g.B * g.C, grain_for(g.Ho * g.Wo * 4), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / g.C, c = t % g.C;
      T* plane = gy + t * g.Ho * g.Wo;
      for (int64_t h = 0; h < g.Ho; ++h)
        for (int64_t w = 0; w < g.Wo; ++w)
          plane[h * g.Wo + w] = static_cast<T>(gather_grad(gout, out, index, g, os, b, c, h, w, relu));
    }
  });
}

bool conv_channels_last(const at::Tensor& x) { return x.size(1) <= 4; }
bool epilogue_channels_last(const at::Tensor& x, bool to_tokens) { return to_tokens || conv_channels_last(x); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> tokenize_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                        const c10::optional<at::Tensor>& bias, int64_t stride,
                                                        int64_t padding, bool relu, int64_t pool_kernel,
                                                        int64_t pool_stride, int64_t pool_padding, bool to_tokens) {
  check_tokenize(x, weight, pool_kernel);
  const bool cl = conv_channels_last(x);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  auto y = at::convolution(x.contiguous(fmt), weight.contiguous(fmt), bias, {stride, stride}, {padding, padding},
                           {1, 1}, false, {0, 0}, 1)
               .contiguous(fmt);
  if (pool_kernel == 0) return conv_epilogue_no_pool(y, relu, to_tokens);
  // Token output: the channels-last epilogue (vectorised over C) even after an NCHW conv; one ATen transpose copy
  // of y plus it beats the scalar plane-wise NCHW epilogue ~3x (measured, 384 x 28 x 28 planes).
  const bool cl_epilogue = epilogue_channels_last(x, to_tokens);
  if (cl_epilogue) y = y.contiguous(at::MemoryFormat::ChannelsLast);
  const PoolGeometry g = pool_geometry(y, pool_kernel, pool_stride, pool_padding);
  auto [out, index, os] = allocate_pooled(y, g, to_tokens);
  CCT_DISPATCH(y.scalar_type(), "tokenize_forward_cpu", [&] {
    if (cl_epilogue)
      pool_forward_cl<scalar_t>(y.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), index.data_ptr<int8_t>(), g, os,
                                relu);
    else
      pool_forward_nchw<scalar_t>(y.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), index.data_ptr<int8_t>(), g, os,
                                  relu);
  });
  return {out, index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tokenize_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& out, const at::Tensor& pool_index, int64_t stride, int64_t padding, bool relu,
    int64_t pool_kernel, int64_t pool_stride, int64_t pool_padding, bool to_tokens, bool needs_input_grad) {
  check_tokenize(x, weight, pool_kernel);
  const bool cl = conv_channels_last(x);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto xin = x.contiguous(fmt), win = weight.contiguous(fmt);
  const auto conv_shape = conv_output_shape(x, weight, stride, padding);
  const auto go = grad_out.contiguous(), o = out.contiguous();
  at::Tensor gy;
  if (pool_kernel == 0) {
    gy = grad_no_pool(go, o, conv_shape, relu, to_tokens).contiguous(fmt);
  } else {
    const bool cl_epilogue = epilogue_channels_last(x, to_tokens);
    gy = at::empty(conv_shape, x.options().memory_format(cl_epilogue ? at::MemoryFormat::ChannelsLast : fmt));
    const PoolGeometry g = pool_geometry(gy, pool_kernel, pool_stride, pool_padding);
    const Strides4 os = pooled_strides(g, to_tokens);
    const auto idx = pool_index.contiguous();
    CCT_DISPATCH(x.scalar_type(), "tokenize_backward_cpu", [&] {
      if (cl_epilogue)
        pool_backward_cl<scalar_t>(go.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), idx.data_ptr<int8_t>(),
                                   gy.data_ptr<scalar_t>(), g, os, relu);
      else
        pool_backward_nchw<scalar_t>(go.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), idx.data_ptr<int8_t>(),
                                     gy.data_ptr<scalar_t>(), g, os, relu);
    });
    gy = gy.contiguous(fmt);  // the convolution backward in the forward's layout
  }
  return conv_backward(gy, xin, win, bias, stride, padding, x, needs_input_grad);
}

}  // namespace cct

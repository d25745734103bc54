// One tokenizer stage on CPU, two paths.
// Direct (the grayscale/RGB stems, see use_direct): the convolution as small patch GEMMs per conv row, pooled
// from cache; the full-resolution activation is never written (see "Direct path" below).
// General: convolution through ATen (oneDNN), then ONE fused pass for ReLU + max pool + the output layout.
// Both write tokens (B, Hp*Wp, C) or a channels-last (B, C, Hp, Wp) (the next stage's convolution reads it without
// a copy), plus the int8 pool_index in out's layout (row-major offset kh*k+kw of the first maximum in the window, as
// torch's max_pool2d picks it). Backward: the conv-output gradient gathered from pool_index (each conv position
// sums the windows whose argmax it is; ReLU'd-away maxima pass nothing), then at::convolution_backward (general)
// or the patch GEMMs (direct); grad_x comes back in x's layout.
// The general convolution runs in oneDNN's faster layout (conv_channels_last); the epilogue reads it channels-last
// (vectorised over C). Dtypes: float32, float16, bfloat16 (computed in float; the epilogue itself does not round).
#include "common.h"
#include "cpu_ops.h"
#include "frozen_weights.h"
#include "../tokenize_common.h"

namespace cct {
namespace {

// x's layout as the op layer names it (ops/tokenize.py, memory_format): channels-last only when not also row-major.
at::MemoryFormat layout_of(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

// out, pool_index or grad_out in the layout this backend writes them: tokens row-major, (B, C, Hp, Wp)
// channels-last; either way channel-fastest, with pooled_strides(g, true).
at::Tensor pooled_layout(const at::Tensor& t, bool to_tokens) {
  return to_tokens ? t.contiguous() : t.contiguous(at::MemoryFormat::ChannelsLast);
}

bool have_avx512() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512;
#else
  return false;
#endif
}

// Max pool of one pooled row (b, ph) from channels-last conv rows: row(h) points at conv row h (Wo x C, any float
// type); writes out/index at os, channel-fastest (os.c == 1). mx, ix: scratch of C floats. The window's argmax code
// is tracked as a float so that the whole loop is one float vector type (int8 lanes beside float lanes keep GCC from
// vectorising).
template <typename T, typename RowFn>
void pool_row_cl(RowFn row, int64_t b, int64_t ph, T* out, int8_t* index, const PoolGeometry& g, const Strides4& os,
                 bool relu, float* __restrict mx, float* __restrict ix) {
  const int64_t C = g.C;
  const float lo = relu ? 0.f : -INFINITY;
  for (int64_t pw = 0; pw < g.Wp; ++pw) {
    std::fill(mx, mx + C, -INFINITY);
    std::fill(ix, ix + C, 0.f);
    for (int64_t kh = 0; kh < g.pk; ++kh) {
      const int64_t h = ph * g.ps - g.pp + kh;
      if (h < 0 || h >= g.Ho) continue;
      const auto* conv_row = row(h);
      for (int64_t kw = 0; kw < g.pk; ++kw) {
        const int64_t w = pw * g.ps - g.pp + kw;
        if (w < 0 || w >= g.Wo) continue;
        const auto* __restrict src = conv_row + w * C;
        const float code = (float)(kh * g.pk + kw);
        // Written without && / || and with the ReLU as a clamp to `lo`: GCC vectorises only this form.
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          float v = to_f(src[c]);
          v = v < lo ? lo : v;
          const float mc = mx[c];
          const bool take = (v > mc) | (v != v);  // first maximum wins; NaN propagates like max_pool2d
          mx[c] = take ? v : mc;
          ix[c] = take ? code : ix[c];
        }
      }
    }
    T* o = out + b * os.b + ph * os.h + pw * os.w;
    int8_t* id = index + b * os.b + ph * os.h + pw * os.w;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      o[c] = static_cast<T>(mx[c]);
      id[c] = (int8_t)ix[c];
    }
  }
}

template <typename T>
void pool_forward_cl(const T* y, T* out, int8_t* index, const PoolGeometry& g, const Strides4& os, bool relu) {
  // y channels-last contiguous: y[b, h, w, c]. One task per (b, pooled row).
  at::parallel_for(0, g.B * g.Hp, grain_for(g.Wp * g.C * g.pk * g.pk), [&](int64_t begin, int64_t end) {
    std::vector<float> mx(g.C), ix(g.C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / g.Hp;
      pool_row_cl(
          [&](int64_t h) { return y + (b * g.Ho + h) * g.Wo * g.C; }, b, t % g.Hp, out, index, g, os, relu,
          mx.data(), ix.data());
    }
  });
}

// d loss / d y[b, h, w, :] (channels-last) into acc[0..C): the windows whose recorded argmax is (h, w) pass their
// grad_out, unless ReLU clipped their maximum. grad_out, out and index at os, channel-fastest (os.c == 1). Returns
// false (acc untouched) when no window covers (h, w).
template <typename T>
bool gather_grad_cl(const T* gout, const T* out, const int8_t* index, const PoolGeometry& g, const Strides4& os,
                    bool relu, int64_t b, int64_t h, int64_t w, float* __restrict acc) {
  const int64_t C = g.C;
  int64_t ph0, ph1, pw0, pw1;
  window_range(h, g.pk, g.ps, g.pp, g.Hp, ph0, ph1);
  window_range(w, g.pk, g.ps, g.pp, g.Wp, pw0, pw1);
  if (ph0 > ph1 || pw0 > pw1) return false;
  std::fill(acc, acc + C, 0.f);
  for (int64_t ph = ph0; ph <= ph1; ++ph)
    for (int64_t pw = pw0; pw <= pw1; ++pw) {
      const int8_t code = (int8_t)((h + g.pp - ph * g.ps) * g.pk + (w + g.pp - pw * g.ps));
      const int64_t off = b * os.b + ph * os.h + pw * os.w;
      const T* go = gout + off;
      const T* o = out + off;
      const int8_t* id = index + off;
      const float codef = code;
      const bool norelu = !relu;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {  // float compare and bitwise ops: the form GCC vectorises
        const bool hit = ((float)id[c] == codef) & (relu_passes(to_f(o[c])) | norelu);
        acc[c] += hit ? to_f(go[c]) : 0.f;
      }
    }
  return true;
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
      for (int64_t w = 0; w < g.Wo; ++w) {
        if (!gather_grad_cl(gout, out, index, g, os, relu, b, h, w, acc.data())) std::fill(acc.begin(), acc.end(), 0.f);
        T* dst = gy + ((b * g.Ho + h) * g.Wo + w) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<T>(acc[c]);
      }
    }
  });
}

// ---- Direct path: convolutions with a small reduction (C_in*kh*kw <= kDirectMaxK: the grayscale and RGB stems, 3x3
// and 7x7). oneDNN runs these memory-bound (writing the full-resolution activation and reading it back costs more
// than the FLOPs), so here each task computes the conv rows its pooled row needs into a ring of pk rows (a row
// shared with the previous pooled row is reused) and pools them from cache: the activation never reaches memory.
// Backward gathers each conv position's gradient from pool_index and accumulates the weight, bias (and input)
// gradients from the input patch in the same pass; per-chunk partial sums are added in a fixed order, so the
// result does not depend on thread scheduling. The backward splits the batch between threads, so with fewer images
// than threads a large stem (K > kDirectSmallK) takes the general backward instead (both read only pool_index and
// out from the forward, whichever path wrote them).
// Measured, 7x7 RGB stem to 64 channels at 224x224, 2 threads (NOTES.md, cpu extension, sixth round): forward
// 20 ms direct against 31 ms through oneDNN at batch 16, about equal at batch 1-8; forward + backward 52 against
// 79 ms at batch 16, 4.8-5.5 against 3.7 ms at batch 1 (one thread's direct backward).
constexpr int64_t kDirectMaxK = 160;
constexpr int64_t kDirectSmallK = 32;

struct ConvGeometry {
  int64_t Cin, H, W, KH, KW, stride, padding;
  int64_t K() const { return Cin * KH * KW; }
};

ConvGeometry conv_geometry(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t padding) {
  return ConvGeometry{x.size(1), x.size(2), x.size(3), weight.size(2), weight.size(3), stride, padding};
}

bool use_direct(const at::Tensor& weight, int64_t pool_kernel) {
  return pool_kernel > 0 && weight.size(1) * weight.size(2) * weight.size(3) <= kDirectMaxK;
}

bool use_direct_backward(const at::Tensor& x, const at::Tensor& weight, int64_t pool_kernel) {
  return use_direct(weight, pool_kernel) &&
         (weight.size(1) * weight.size(2) * weight.size(3) <= kDirectSmallK || x.size(0) >= at::get_num_threads());
}

// Calls f(k, offset) for every input element of conv position (h, w) inside the image; k = (ci*KH + i)*KW + j
// (weight's layout), offset into one image (C_in, H, W). Padding positions are skipped.
template <typename F>
inline void for_patch(const ConvGeometry& cg, int64_t h, int64_t w, F&& f) {
  for (int64_t ci = 0; ci < cg.Cin; ++ci)
    for (int64_t i = 0; i < cg.KH; ++i) {
      const int64_t hi = h * cg.stride - cg.padding + i;
      if (hi < 0 || hi >= cg.H) continue;
      for (int64_t j = 0; j < cg.KW; ++j) {
        const int64_t wi = w * cg.stride - cg.padding + j;
        if (wi >= 0 && wi < cg.W) f((ci * cg.KH + i) * cg.KW + j, (ci * cg.H + hi) * cg.W + wi);
      }
    }
}

// The im2col rows of conv row h of image xb: patches[w, k] (Wo x K), zero where the window leaves the image.
// Positions whose window lies inside the row copy KW consecutive inputs per (ci, i), KW a compile-time constant
// for the usual 3, 5 and 7; only the edge positions go through for_patch's bounds checks. For the 7x7 RGB stem
// this is ~10x faster than for_patch everywhere, which cost as much as the conv row's GEMM.
template <int64_t KWc, typename T>
void load_patches_kw(const T* xb, const ConvGeometry& cg, int64_t Wo, int64_t h, float* patches) {
  const int64_t K = cg.K(), KW = KWc > 0 ? KWc : cg.KW;
  for (int64_t w = 0; w < Wo; ++w) {
    float* __restrict p = patches + w * K;
    const int64_t w0 = w * cg.stride - cg.padding;
    if (w0 < 0 || w0 + KW > cg.W) {
      std::fill(p, p + K, 0.f);
      for_patch(cg, h, w, [&](int64_t k, int64_t off) { p[k] = to_f(xb[off]); });
      continue;
    }
    for (int64_t ci = 0; ci < cg.Cin; ++ci)
      for (int64_t i = 0; i < cg.KH; ++i, p += KW) {
        const int64_t hi = h * cg.stride - cg.padding + i;
        if (hi < 0 || hi >= cg.H) {
          std::fill(p, p + KW, 0.f);
          continue;
        }
        const T* __restrict src = xb + (ci * cg.H + hi) * cg.W + w0;
        for (int64_t j = 0; j < KW; ++j) p[j] = to_f(src[j]);
      }
  }
}

template <typename T>
void load_patches(const T* xb, const ConvGeometry& cg, int64_t Wo, int64_t h, float* patches) {
  switch (cg.KW) {
    case 3: return load_patches_kw<3>(xb, cg, Wo, h, patches);
    case 5: return load_patches_kw<5>(xb, cg, Wo, h, patches);
    case 7: return load_patches_kw<7>(xb, cg, Wo, h, patches);
    default: return load_patches_kw<0>(xb, cg, Wo, h, patches);
  }
}

// Conv row h of image xb, channels-last float (Wo x C) = patches (Wo x K) @ wt (K x C) + bias: one small GEMM.
template <typename T>
void conv_row(const T* xb, const ConvGeometry& cg, const float* wt, const float* bias, int64_t C, int64_t Wo,
              int64_t h, float* row, float* patches) {
  load_patches(xb, cg, Wo, h, patches);
  if (bias != nullptr)
    for (int64_t w = 0; w < Wo; ++w) std::copy(bias, bias + C, row + w * C);
  gemm_rm(false, false, Wo, C, cg.K(), 1.f, patches, cg.K(), wt, C, bias != nullptr ? 1.f : 0.f, row, C);
}

template <typename T>
void direct_forward(const T* x, const float* wt, const float* bias, T* out, int8_t* index, const ConvGeometry& cg,
                    const PoolGeometry& g, const Strides4& os, bool relu) {
  const int64_t C = g.C, image = cg.Cin * cg.H * cg.W;
  at::parallel_for(0, g.B * g.Hp, grain_for(g.ps * g.Wo * C * cg.K()), [&](int64_t begin, int64_t end) {
    std::vector<float> rows(g.pk * g.Wo * C), mx(C), ix(C), patches(g.Wo * cg.K());
    std::vector<int64_t> held(g.pk, -1);  // which conv row (b*Ho + h) each ring slot holds
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / g.Hp;
      auto row = [&](int64_t h) -> const float* {
        const int64_t slot = h % g.pk;  // a window's pk consecutive rows fall in distinct slots
        float* r = rows.data() + slot * g.Wo * C;
        if (held[slot] != b * g.Ho + h) {
          conv_row(x + b * image, cg, wt, bias, C, g.Wo, h, r, patches.data());
          held[slot] = b * g.Ho + h;
        }
        return r;
      };
      pool_row_cl(row, b, t % g.Hp, out, index, g, os, relu, mx.data(), ix.data());
    }
  });
}

// grad_wt (K x C) and grad_b (C) are written; grad_x (float, x's shape) is written when not null.
template <typename T>
void direct_backward(const T* gout, const T* out, const int8_t* index, const T* x, const float* wt,
                     const ConvGeometry& cg, const PoolGeometry& g, const Strides4& os, bool relu, float* grad_wt,
                     float* grad_b, float* grad_x) {
  const int64_t C = g.C, K = cg.K(), image = cg.Cin * cg.H * cg.W;
  const int64_t chunks = std::min<int64_t>(g.B, at::get_num_threads());
  std::vector<float> partial(chunks * (K + 1) * C, 0.f);  // per chunk: K x C weight rows, then the bias row
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    // Per band of conv rows: its gradient G (n x C, n = rows * Wo; zero where no window's argmax lands) and its
    // patches P (n x K), then grad_wt += P^T G, grad_b += column sums of G, and the input-patch gradients G wt^T
    // scattered into grad_x. Bands of ~64k gradient values keep the GEMMs few and the buffers in L2.
    const int64_t band = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, g.Wo * C));
    std::vector<float> grad_rows(band * g.Wo * C), patches(band * g.Wo * K), patch_grads(band * g.Wo * K);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* gw = partial.data() + chunk * (K + 1) * C;
      float* __restrict gb = gw + K * C;
      for (int64_t b = g.B * chunk / chunks; b < g.B * (chunk + 1) / chunks; ++b) {
        const T* xb = x + b * image;
        for (int64_t h0 = 0; h0 < g.Ho; h0 += band) {
          const int64_t rows = std::min(band, g.Ho - h0), n = rows * g.Wo;
          for (int64_t i = 0; i < n; ++i) {
            const int64_t h = h0 + i / g.Wo, w = i % g.Wo;
            float* gr = grad_rows.data() + i * C;
            if (!gather_grad_cl(gout, out, index, g, os, relu, b, h, w, gr)) std::fill(gr, gr + C, 0.f);
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) gb[c] += gr[c];
          }
          for (int64_t r = 0; r < rows; ++r) load_patches(xb, cg, g.Wo, h0 + r, patches.data() + r * g.Wo * K);
          gemm_rm(true, false, K, C, n, 1.f, patches.data(), K, grad_rows.data(), C, 1.f, gw, C);
          if (grad_x == nullptr) continue;
          // images are split between chunks: no two chunks write one grad_x element
          gemm_rm(false, true, n, K, C, 1.f, grad_rows.data(), C, wt, C, 0.f, patch_grads.data(), K);
          for (int64_t i = 0; i < n; ++i)
            for_patch(cg, h0 + i / g.Wo, i % g.Wo,
                      [&](int64_t k, int64_t off) { grad_x[b * image + off] += patch_grads[i * K + k]; });
        }
      }
    }
  });
  std::fill(grad_wt, grad_wt + K * C, 0.f);
  std::fill(grad_b, grad_b + C, 0.f);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const float* p = partial.data() + chunk * (K + 1) * C;
    for (int64_t i = 0; i < K * C; ++i) grad_wt[i] += p[i];
    for (int64_t c = 0; c < C; ++c) grad_b[c] += p[K * C + c];
  }
}

// weight (C, C_in, kh, kw) as float (K x C): the right-hand operand of the patch GEMMs.
at::Tensor weight_kc(const at::Tensor& weight) {
  return weight.reshape({weight.size(0), -1}).t().to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor> direct_tokenize_forward(const at::Tensor& x, const at::Tensor& weight,
                                                           const c10::optional<at::Tensor>& bias, int64_t stride,
                                                           int64_t padding, bool relu, int64_t pool_kernel,
                                                           int64_t pool_stride, int64_t pool_padding, bool to_tokens) {
  const auto xc = x.contiguous(), wt = weight_kc(weight);
  const bool has_bias = bias.has_value() && bias->defined();
  const auto bf = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const PoolGeometry g =
      pool_geometry(conv_output_shape(x, weight, stride, padding), pool_kernel, pool_stride, pool_padding);
  auto [out, index, os] = allocate_pooled(x.options(), g, to_tokens, true);
  const ConvGeometry cg = conv_geometry(x, weight, stride, padding);
  CCT_DISPATCH(x.scalar_type(), "tokenize_forward_cpu", [&] {
    direct_forward<scalar_t>(xc.data_ptr<scalar_t>(), wt.data_ptr<float>(),
                             has_bias ? bf.data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(),
                             index.data_ptr<int8_t>(), cg, g, os, relu);
  });
  return {out, index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_tokenize_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& out, const at::Tensor& pool_index, int64_t stride, int64_t padding, bool relu,
    int64_t pool_kernel, int64_t pool_stride, int64_t pool_padding, bool to_tokens, bool needs_input_grad) {
  const auto xc = x.contiguous(), wt = weight_kc(weight);
  const auto go = pooled_layout(grad_out, to_tokens), o = pooled_layout(out, to_tokens),
             idx = pooled_layout(pool_index, to_tokens);
  const PoolGeometry g =
      pool_geometry(conv_output_shape(x, weight, stride, padding), pool_kernel, pool_stride, pool_padding);
  const ConvGeometry cg = conv_geometry(x, weight, stride, padding);
  const auto f32 = x.options().dtype(at::kFloat);
  auto grad_wt = at::empty({cg.K(), g.C}, f32), grad_b = at::empty({g.C}, f32);
  auto grad_x = needs_input_grad ? at::zeros(x.sizes(), f32) : at::empty({0}, x.options());
  CCT_DISPATCH(x.scalar_type(), "tokenize_backward_cpu", [&] {
    direct_backward<scalar_t>(go.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), idx.data_ptr<int8_t>(),
                              xc.data_ptr<scalar_t>(), wt.data_ptr<float>(), cg, g, pooled_strides(g, true),
                              relu, grad_wt.data_ptr<float>(), grad_b.data_ptr<float>(),
                              needs_input_grad ? grad_x.data_ptr<float>() : nullptr);
  });
  const bool has_bias = bias.has_value() && bias->defined();
  return {needs_input_grad ? grad_x.to(x.scalar_type()).contiguous(layout_of(x)) : grad_x,
          grad_wt.t().reshape(weight.sizes()).to(weight.scalar_type()),
          has_bias ? grad_b.to(bias->scalar_type()) : at::empty({0}, x.options())};
}

// oneDNN's faster layout (measured, forward and backward). On an AVX2 machine: channels-last for the RGB 7x7 stem
// (~1.6x) and for 3x3 kernels (64 -> 128 at 14x14: ~1.4x); NCHW for 7x7 over 64 channels (~1.2x at batch 16,
// ~1.6x at batch 1). With AVX-512, channels-last for those too (64 -> 384 7x7 at 56x56, batch 16: forward 75 vs
// 95 ms, backward 184 vs 194 ms; NOTES.md, cpu extension, sixth round). 1x1 kernels stay NCHW: torch 2.13's
// channels-last convolution_backward returns a wrong weight gradient, intermittently, for some strided 1x1
// convolutions (seen: 5 -> 5 channels, stride 2, 10x12 input).
bool conv_channels_last(const at::Tensor& x, const at::Tensor& weight) {
  const int64_t taps = weight.size(2) * weight.size(3);
  return taps > 1 && (x.size(1) <= 4 || taps <= 9 || have_avx512());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tokenize_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                        const c10::optional<at::Tensor>& bias, int64_t stride,
                                                        int64_t padding, bool relu, int64_t pool_kernel,
                                                        int64_t pool_stride, int64_t pool_padding, bool to_tokens) {
  check_tokenize(x, weight, pool_kernel);
  if (use_direct(weight, pool_kernel))
    return direct_tokenize_forward(x, weight, bias, stride, padding, relu, pool_kernel, pool_stride, pool_padding,
                                   to_tokens);
  const bool cl = conv_channels_last(x, weight);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor frozen = cl ? frozen_channels_last_weight(weight) : at::Tensor();  // else a copy per call
  auto y = at::convolution(x.contiguous(fmt), frozen.defined() ? frozen : weight.contiguous(fmt), bias,
                           {stride, stride}, {padding, padding}, {1, 1}, false, {0, 0}, 1)
               .contiguous(fmt);
  if (pool_kernel == 0) return conv_epilogue_no_pool(y, relu, to_tokens, true);
  // The channels-last epilogue (vectorised over C) even after an NCHW conv: one ATen transpose copy of y plus it
  // beats a scalar plane-wise NCHW epilogue ~3x (measured, 384 x 28 x 28 planes).
  y = y.contiguous(at::MemoryFormat::ChannelsLast);
  const PoolGeometry g = pool_geometry(y.sizes(), pool_kernel, pool_stride, pool_padding);
  auto [out, index, os] = allocate_pooled(y.options(), g, to_tokens, true);
  CCT_DISPATCH(y.scalar_type(), "tokenize_forward_cpu", [&] {
    pool_forward_cl<scalar_t>(y.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), index.data_ptr<int8_t>(), g, os,
                              relu);
  });
  return {out, index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tokenize_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& out, const at::Tensor& pool_index, int64_t stride, int64_t padding, bool relu,
    int64_t pool_kernel, int64_t pool_stride, int64_t pool_padding, bool to_tokens, bool needs_input_grad) {
  check_tokenize(x, weight, pool_kernel);
  if (use_direct_backward(x, weight, pool_kernel))
    return direct_tokenize_backward(grad_out, x, weight, bias, out, pool_index, stride, padding, relu, pool_kernel,
                                    pool_stride, pool_padding, to_tokens, needs_input_grad);
  const bool cl = conv_channels_last(x, weight);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto xin = x.contiguous(fmt), win = weight.contiguous(fmt);
  const auto conv_shape = conv_output_shape(x, weight, stride, padding);
  const auto go = pooled_layout(grad_out, to_tokens), o = pooled_layout(out, to_tokens);
  at::Tensor gy;
  if (pool_kernel == 0) {
    gy = grad_no_pool(go, o, conv_shape, relu, to_tokens).contiguous(fmt);
  } else {
    gy = at::empty(conv_shape, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    const PoolGeometry g = pool_geometry(gy.sizes(), pool_kernel, pool_stride, pool_padding);
    const auto idx = pooled_layout(pool_index, to_tokens);
    CCT_DISPATCH(x.scalar_type(), "tokenize_backward_cpu", [&] {
      pool_backward_cl<scalar_t>(go.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), idx.data_ptr<int8_t>(),
                                 gy.data_ptr<scalar_t>(), g, pooled_strides(g, true), relu);
    });
    gy = gy.contiguous(fmt);  // the convolution backward in the forward's layout
  }
  return conv_backward(gy, xin, win, bias, stride, padding, x, needs_input_grad, layout_of(x));
}

}  // namespace cct

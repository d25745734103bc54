// The text tokenizer stage on CPU: conv over the sequence with a kernel spanning the whole word vector -> ReLU ->
// max pool along the sequence -> tokens (B, N, E). Shapes and the kernel interface: cct_kernels/ops/text_tokenize.py.
//
// Conv row h of sequence b reads the window of k word vectors starting at row h*s - pad: k*C contiguous values,
// the next window starting s*C later. The windows are read in place (no im2col copy): one GEMM with K = k*C when
// they do not overlap (s >= k: the text_cvt patches), else k GEMMs, one per tap j, Y (rows x E) += X_j (rows x C,
// row stride s*C) @ W_j^T (C x E), since overlapping rows would need a leading dimension s*C < k*C, which BLAS
// rejects. Windows that leave the sequence (the zero padding), and 16-bit inputs, read a float copy of the band's
// input rows instead.
// Forward: per task a band of tokens; its conv rows are computed into cache, then ReLU and the pool write the tokens
// and the int8 pool_index (offset of the first maximum inside the window; a NaN wins, as max_pool2d).
// Backward: per task a band of conv rows; its gradient G is gathered from pool_index (ReLU'd-away maxima pass
// nothing), grad_weight += G^T X_j per tap (or per whole window) into a per-chunk partial (chunks summed in a fixed
// order: deterministic), and grad_x from P = G @ W (rows x k*C): each owned input row sums the overlapping windows'
// slices of P.
#include "common.h"
#include "cpu_ops.h"
#include "output_cache.h"
#include "../pool_geometry.h"

#include <type_traits>
#include <vector>

namespace cct {
namespace {

struct TextGeometry {
  int64_t B, L, C, E, k, s, pad;  // input, conv
  int64_t Lc;                     // conv rows
  int64_t pk, ps, pp, N;          // pool (pk == 0: none) and tokens
  int64_t KC() const { return k * C; }
  // The window GEMMs' reduction: whole windows when they do not overlap, else one tap (C values) per GEMM.
  int64_t gemm_k() const { return s >= k ? k * C : C; }
};

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

TextGeometry text_geometry(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t padding,
                           int64_t pool_kernel, int64_t pool_stride, int64_t pool_padding) {
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 3 && weight.size(2) == x.size(2),
              "text_tokenize (cpu): x must be (B, L, C) and weight (E, k, C)");
  TORCH_CHECK(pool_kernel >= 0 && pool_kernel <= 127, "text_tokenize (cpu): pool kernel must be in [0, 127]");
  TextGeometry g{x.size(0), x.size(1), x.size(2), weight.size(0), weight.size(1), stride, padding};
  g.Lc = (g.L + 2 * padding - g.k) / stride + 1;
  g.pk = pool_kernel;
  g.ps = pool_kernel ? pool_stride : 1;
  g.pp = pool_kernel ? pool_padding : 0;
  g.N = pool_kernel ? (g.Lc + 2 * g.pp - g.pk) / g.ps + 1 : g.Lc;
  TORCH_CHECK(g.Lc >= 1 && g.N >= 1, "text_tokenize (cpu): the sequence is too short for the conv and pool");
  return g;
}

// Bands of about kBandRows conv rows per task: the rows (E floats each) and their input stay in L2.
constexpr int64_t kBandRows = 64;

// n items in bands of at most max_band, evenly: the band size.
int64_t even_band(int64_t n, int64_t max_band) {
  const int64_t bands = (n + max_band - 1) / max_band;
  return (n + bands - 1) / bands;
}

// Pointer to the windows of conv rows [h0, h1) of sequence xb as float rows of C (window h at row (h - h0) * s):
// x itself when it is float and every window lies inside the sequence, else `span` filled with the input rows
// [h0*s - pad, (h1-1)*s - pad + k) converted to float (zero rows outside the sequence).
template <typename T>
const float* window_rows(const T* xb, const TextGeometry& g, int64_t h0, int64_t h1, float* span) {
  const int64_t r0 = h0 * g.s - g.pad, r1 = (h1 - 1) * g.s - g.pad + g.k;
  if constexpr (std::is_same_v<T, float>) {
    if (r0 >= 0 && r1 <= g.L) return xb + r0 * g.C;
  }
  for (int64_t r = r0; r < r1; ++r) {
    float* __restrict dst = span + (r - r0) * g.C;
    if (r < 0 || r >= g.L) {
      std::fill(dst, dst + g.C, 0.f);
      continue;
    }
    const T* __restrict src = xb + r * g.C;
#pragma omp simd
    for (int64_t c = 0; c < g.C; ++c) dst[c] = to_f(src[c]);
  }
  return span;
}

// Conv rows [h0, h1) of sequence xb into y (rows x E, float): GEMMs over the in-place windows. w: (E x k*C) float.
template <typename T>
void conv_rows(const T* xb, const float* w, const TextGeometry& g, int64_t h0, int64_t h1, float* y, float* span) {
  if (h1 <= h0) return;
  const float* a = window_rows(xb, g, h0, h1, span);
  const int64_t K = g.gemm_k();
  for (int64_t j = 0; j < g.KC(); j += K)
    gemm_rm(false, true, h1 - h0, g.E, K, 1.f, a + j, g.s * g.C, w + j, g.KC(), j ? 1.f : 0.f, y, g.E);
}

int64_t span_floats(const TextGeometry& g, int64_t rows) { return ((rows - 1) * g.s + g.k) * g.C; }

template <typename T>
void forward_kernel(const T* x, const float* w, T* out, int8_t* index, const TextGeometry& g, bool relu) {
  const int64_t E = g.E;
  // A band of tokens needs (band - 1) * ps + pk conv rows (band rows without pool).
  const int64_t band = even_band(g.N, g.pk ? std::max<int64_t>(1, kBandRows / g.ps) : kBandRows);
  const int64_t bands = (g.N + band - 1) / band, max_rows = g.pk ? (band - 1) * g.ps + g.pk : band;
  at::parallel_for(0, g.B * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(max_rows * E), span(span_floats(g, max_rows)), mx(E), ix(E);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / bands, p0 = (t % bands) * band, p1 = std::min(g.N, p0 + band);
      const T* xb = x + b * g.L * g.C;
      T* ob = out + b * g.N * E;
      if (!g.pk) {
        conv_rows(xb, w, g, p0, p1, y.data(), span.data());
        for (int64_t p = p0; p < p1; ++p) {
          const float* __restrict src = y.data() + (p - p0) * E;
          T* __restrict o = ob + p * E;
#pragma omp simd
          for (int64_t e = 0; e < E; ++e) o[e] = static_cast<T>(relu && src[e] < 0.f ? 0.f : src[e]);  // keeps NaN
        }
        continue;
      }
      const int64_t h0 = std::max<int64_t>(0, p0 * g.ps - g.pp), h1 = std::min(g.Lc, (p1 - 1) * g.ps - g.pp + g.pk);
      conv_rows(xb, w, g, h0, h1, y.data(), span.data());
      const float lo = relu ? 0.f : -INFINITY;  // max(relu(v)) = relu(max(v)): the ReLU as a clamp of each value
      for (int64_t p = p0; p < p1; ++p) {
        std::fill(mx.begin(), mx.end(), -INFINITY);
        std::fill(ix.begin(), ix.end(), 0.f);
        for (int64_t q = 0; q < g.pk; ++q) {
          const int64_t h = p * g.ps - g.pp + q;
          if (h < h0 || h >= h1) continue;  // the pool's -inf padding
          const float* __restrict src = y.data() + (h - h0) * E;
          float* __restrict m = mx.data();
          float* __restrict id = ix.data();
          const float code = (float)q;
#pragma omp simd
          for (int64_t e = 0; e < E; ++e) {  // float compares and bitwise ops: the form GCC vectorises
            float v = src[e];
            v = v < lo ? lo : v;
            const bool take = (v > m[e]) | (v != v);  // first maximum wins; NaN propagates like max_pool2d
            m[e] = take ? v : m[e];
            id[e] = take ? code : id[e];
          }
        }
        T* __restrict o = ob + p * E;
        int8_t* __restrict idx = index + (b * g.N + p) * E;
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) {
          o[e] = static_cast<T>(mx[e]);
          idx[e] = (int8_t)ix[e];
        }
      }
    }
  });
}

// d loss / d conv rows [h0, h1) of sequence b into G (rows x E): the tokens whose pool window picked the row pass
// their gradient (without pool, token h itself), unless ReLU clipped their output.
template <typename T>
void gather_rows(const T* gout, const T* out, const int8_t* index, const TextGeometry& g, bool relu, int64_t b,
                 int64_t h0, int64_t h1, float* G) {
  const int64_t E = g.E;
  const bool norelu = !relu;
  for (int64_t h = h0; h < h1; ++h) {
    float* __restrict acc = G + (h - h0) * E;
    std::fill(acc, acc + E, 0.f);
    int64_t p0 = h, p1 = h;
    if (g.pk) window_range(h, g.pk, g.ps, g.pp, g.N, p0, p1);
    for (int64_t p = p0; p <= p1; ++p) {
      const int64_t off = (b * g.N + p) * E;
      const T* __restrict go = gout + off;
      const T* __restrict o = out + off;
      const float code = g.pk ? (float)(h + g.pp - p * g.ps) : 0.f;
      const int8_t* __restrict id = g.pk ? index + off : nullptr;
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) {
        const bool picked = id == nullptr || (float)id[e] == code;
        const bool hit = picked & (relu_passes(to_f(o[e])) | norelu);
        acc[e] += hit ? to_f(go[e]) : 0.f;
      }
    }
  }
}

// grad_w (E x k*C) and grad_x (float, x's shape, or nullptr) are written.
template <typename T>
void backward_kernel(const T* gout, const T* out, const int8_t* index, const T* x, const float* w,
                     const TextGeometry& g, bool relu, float* grad_w, float* grad_x) {
  const int64_t E = g.E, C = g.C, KC = g.KC();
  const int64_t band = even_band(g.Lc, kBandRows), bands = (g.Lc + band - 1) / band, tasks = g.B * bands;
  const int64_t chunks = std::min<int64_t>(tasks, at::get_num_threads());
  // A band's owned input rows need the conv rows up to (k - 1) / s before it (the windows reaching into it).
  const int64_t back = (g.k - 1 + g.s - 1) / g.s + 1, max_rows = band + back;
  std::vector<float> partial(chunks * E * KC, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> G(max_rows * E), span(span_floats(g, band)), P(grad_x ? max_rows * KC : 0);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* gw = partial.data() + chunk * E * KC;
      for (int64_t t = tasks * chunk / chunks; t < tasks * (chunk + 1) / chunks; ++t) {
        const int64_t b = t / bands, band_i = t % bands;
        const int64_t h0 = band_i * band, h1 = std::min(g.Lc, h0 + band);
        // Input rows [i0, i1) are this task's: they end where the next band's first window starts.
        const int64_t i0 = band_i == 0 ? 0 : std::clamp<int64_t>(h0 * g.s - g.pad, 0, g.L);
        const int64_t i1 = band_i == bands - 1 ? g.L : std::clamp<int64_t>(h1 * g.s - g.pad, 0, g.L);
        // Conv rows [hg0, hg1) have windows in the owned rows (none when the band owns no row).
        const int64_t hg0 = i1 > i0 ? std::max<int64_t>(0, -floor_div(-(i0 + g.pad - g.k + 1), g.s)) : h0;  // ceil
        const int64_t hg1 = i1 > i0 ? std::min(g.Lc, floor_div(i1 - 1 + g.pad, g.s) + 1) : h0;
        const int64_t ga = std::min(h0, hg0), gb = std::max(h1, hg1);
        gather_rows(gout, out, index, g, relu, b, ga, gb, G.data());
        const T* xb = x + b * g.L * C;
        const float* a = window_rows(xb, g, h0, h1, span.data());
        for (int64_t j = 0; j < KC; j += g.gemm_k())
          gemm_rm(true, false, E, g.gemm_k(), h1 - h0, 1.f, G.data() + (h0 - ga) * E, E, a + j, g.s * C, 1.f, gw + j,
                  KC);
        if (grad_x == nullptr || hg1 <= hg0) continue;
        gemm_rm(false, false, hg1 - hg0, KC, E, 1.f, G.data() + (hg0 - ga) * E, E, w, KC, 0.f, P.data(), KC);
        for (int64_t i = i0; i < i1; ++i) {
          float* __restrict gx = grad_x + (b * g.L + i) * C;
          const int64_t first = std::max(hg0, -floor_div(-(i + g.pad - g.k + 1), g.s));
          const int64_t last = std::min(hg1 - 1, floor_div(i + g.pad, g.s));
          for (int64_t h = first; h <= last; ++h) {  // windows holding row i, in order: deterministic sums
            const float* __restrict src = P.data() + (h - hg0) * KC + (i + g.pad - h * g.s) * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) gx[c] += src[c];
          }
        }
      }
    }
  });
  std::fill(grad_w, grad_w + E * KC, 0.f);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const float* __restrict p = partial.data() + chunk * E * KC;
    for (int64_t i = 0; i < E * KC; ++i) grad_w[i] += p[i];
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> text_tokenize_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                             int64_t stride, int64_t padding, bool relu,
                                                             int64_t pool_kernel, int64_t pool_stride,
                                                             int64_t pool_padding) {
  const TextGeometry g = text_geometry(x, weight, stride, padding, pool_kernel, pool_stride, pool_padding);
  const auto xc = x.contiguous(), w = weight.to(at::kFloat).contiguous();
  auto out = cached_empty({g.B, g.N, g.E}, x.options());
  const std::vector<int64_t> index_shape = pool_kernel ? std::vector<int64_t>{g.B, g.N, g.E} : std::vector<int64_t>{0};
  auto index = at::empty(index_shape, x.options().dtype(at::kChar));
  CCT_DISPATCH(x.scalar_type(), "text_tokenize_forward_cpu", [&] {
    forward_kernel<scalar_t>(xc.data_ptr<scalar_t>(), w.data_ptr<float>(), out.data_ptr<scalar_t>(),
                             pool_kernel ? index.data_ptr<int8_t>() : nullptr, g, relu);
  });
  return {out, index};
}

std::tuple<at::Tensor, at::Tensor> text_tokenize_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& weight, const at::Tensor& out,
                                                              const at::Tensor& pool_index, int64_t stride,
                                                              int64_t padding, bool relu, int64_t pool_kernel,
                                                              int64_t pool_stride, int64_t pool_padding,
                                                              bool needs_input_grad) {
  const TextGeometry g = text_geometry(x, weight, stride, padding, pool_kernel, pool_stride, pool_padding);
  const auto xc = x.contiguous(), w = weight.to(at::kFloat).contiguous();
  const auto go = grad_out.contiguous(), o = out.contiguous(), idx = pool_index.contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  auto grad_w = at::empty(weight.sizes(), f32);
  auto grad_x = needs_input_grad ? at::zeros(x.sizes(), f32) : at::empty({0}, x.options());
  CCT_DISPATCH(x.scalar_type(), "text_tokenize_backward_cpu", [&] {
    backward_kernel<scalar_t>(go.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                              pool_kernel ? idx.data_ptr<int8_t>() : nullptr, xc.data_ptr<scalar_t>(),
                              w.data_ptr<float>(), g, relu, grad_w.data_ptr<float>(),
                              needs_input_grad ? grad_x.data_ptr<float>() : nullptr);
  });
  return {needs_input_grad ? grad_x.to(x.scalar_type()) : grad_x, grad_w.to(weight.scalar_type())};
}

}  // namespace cct

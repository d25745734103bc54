// SeqPool on CPU: out[b] = sum_n softmax_n(x[b,n].w + bias) x[b,n], one pass over x from memory with an online
// softmax per block of rows (each block is read twice, the second time from L2).
// x (B, N, D) float32/float16/bfloat16 contiguous, weight (1, D), bias (1,); float32 accumulation. out is float32
// whatever x's dtype: the backward centres its score gradients on it (cct_kernels/ops/seqpool.py says why).
// Parallel over batch rows, and over chunks of N when B is smaller than the thread count (partials merged after).
#include "common.h"
#include "cpu_ops.h"
#include "output_cache.h"

namespace cct {
namespace {

// Number of N-chunks per batch row: 1 when the batch alone keeps every thread busy.
int64_t chunks_per_row(int64_t B, int64_t N, int64_t D) {
  const int64_t threads = at::get_num_threads();
  if (B == 0 || B >= threads || N * D < (1 << 18)) return 1;  // small rows: one thread, no team wake-up
  const int64_t want = (threads + B - 1) / B;
  return std::max<int64_t>(1, std::min<int64_t>(want, N / 32));
}

constexpr int64_t kRows = 64;  // rows per block: 64 x D floats stay in L2 between the two passes

// s[i] = X[i] . w for `rows` rows of length D. Four rows per sweep: four independent FMA chains (one chain per
// row leaves the dot latency-bound), and w is loaded once per four rows. Inline loops rather than BLAS GEMV calls,
// whose per-call cost dominated at 64 rows.
inline void row_dots(const float* X, int64_t rows, int64_t D, const float* w, float* s) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    const float *x0 = X + i * D, *x1 = x0 + D, *x2 = x1 + D, *x3 = x2 + D;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t k = 0; k < D; ++k) {
      s0 += x0[k] * w[k];
      s1 += x1[k] * w[k];
      s2 += x2[k] * w[k];
      s3 += x3[k] * w[k];
    }
    s[i] = s0;
    s[i + 1] = s1;
    s[i + 2] = s2;
    s[i + 3] = s3;
  }
  for (; i < rows; ++i) {
    const float* xi = X + i * D;
    float si = 0.f;
#pragma omp simd reduction(+ : si)
    for (int64_t k = 0; k < D; ++k) si += xi[k] * w[k];
    s[i] = si;
  }
}

// acc[k] += sum_i c[i] X[i, k]: four rows per sweep, so acc is loaded and stored once per four rows.
inline void add_weighted_rows(const float* X, int64_t rows, int64_t D, const float* c, float* __restrict acc) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    const float *x0 = X + i * D, *x1 = x0 + D, *x2 = x1 + D, *x3 = x2 + D;
    const float c0 = c[i], c1 = c[i + 1], c2 = c[i + 2], c3 = c[i + 3];
#pragma omp simd
    for (int64_t k = 0; k < D; ++k) acc[k] += c0 * x0[k] + c1 * x1[k] + c2 * x2[k] + c3 * x3[k];
  }
  for (; i < rows; ++i) {
    const float* xi = X + i * D;
    const float ci = c[i];
#pragma omp simd
    for (int64_t k = 0; k < D; ++k) acc[k] += ci * xi[k];
  }
}

// Rows [n, n + m) of x[b] as float32 rows (in place for float32; widened into buf otherwise).
template <typename T>
const float* rows_f32(const T* src, int64_t m, int64_t D, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    buf.resize(m * D);
    for (int64_t i = 0; i < m * D; ++i) buf[i] = to_f(src[i]);
    return buf.data();
  }
}

// Per block of kRows rows: scores s = X w, one online-softmax rescale per block, acc += X^T e: x is read from
// memory once (the block is re-read from L2).
// Key padding: row b pools its first real_tokens(lengths, b, N) tokens; a row with none gives zeros, lse = -inf.
template <typename T>
void seqpool_forward_kernel(const T* x, const T* w_in, float bias, float* out, float* lse, int64_t B, int64_t N,
                            int64_t D, const int64_t* lengths) {
  const int64_t nc = chunks_per_row(B, N, D);
  const int64_t chunk = (N + nc - 1) / nc;
  std::vector<float> w(D), m(B * nc), z(B * nc), acc(B * nc * D);
  for (int64_t k = 0; k < D; ++k) w[k] = to_f(w_in[k]);
  at::parallel_for(0, B * nc, grain_for(chunk * D), [&](int64_t begin, int64_t end) {
    std::vector<float> buf, e(kRows);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nc, n0 = (t % nc) * chunk, n1 = std::min(real_tokens(lengths, b, N), n0 + chunk);
      float* a = acc.data() + t * D;
      std::fill(a, a + D, 0.f);
      float mx = -INFINITY, sum = 0.f;
      for (int64_t n = n0; n < n1; n += kRows) {
        const int64_t rows = std::min(kRows, n1 - n);
        const float* X = rows_f32(x + (b * N + n) * D, rows, D, buf);
        row_dots(X, rows, D, w.data(), e.data());
        float bm = -INFINITY;
        for (int64_t i = 0; i < rows; ++i) bm = std::max(bm, e[i] + bias);
        if (bm > mx) {  // new running max: rescale what was accumulated
          const float r = std::exp(mx - bm);
          sum *= r;
#pragma omp simd
          for (int64_t k = 0; k < D; ++k) a[k] *= r;
          mx = bm;
        }
        float* __restrict ep = e.data();
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < rows; ++i) {
          ep[i] = exp_approx(ep[i] + bias - mx);
          sum += ep[i];
        }
        add_weighted_rows(X, rows, D, e.data(), a);
      }
      m[t] = mx;
      z[t] = sum;
    }
  });
  // Merge the chunk partials of each row (empty chunks have mx = -inf, sum = 0).
  at::parallel_for(0, B, grain_for(nc * D), [&](int64_t begin, int64_t end) {
    std::vector<float> o(D);
    for (int64_t b = begin; b < end; ++b) {
      float M = -INFINITY;
      for (int64_t c = 0; c < nc; ++c) M = std::max(M, m[b * nc + c]);
      float Z = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t c = 0; c < nc; ++c) {
        if (z[b * nc + c] == 0.f) continue;
        const float r = std::exp(m[b * nc + c] - M);
        Z += z[b * nc + c] * r;
        const float* a = acc.data() + (b * nc + c) * D;
#pragma omp simd
        for (int64_t k = 0; k < D; ++k) o[k] += r * a[k];
      }
      const float inv = Z > 0.f ? 1.f / Z : 0.f;
      for (int64_t k = 0; k < D; ++k) out[b * D + k] = o[k] * inv;
      lse[b] = Z > 0.f ? M + std::log(Z) : -INFINITY;
    }
  });
}

// p_n = exp(s_n - lse); ds_n = p_n (g.x_n - g.out); dx_n = p_n g + ds_n w; dw = sum ds_n x_n; db = sum ds_n.
// Per block: s = X w, g.(x_n - out) per row, the rank-2 row update, dw += X^T ds. out: the forward's, float32.
template <typename T>
void seqpool_backward_kernel(const T* g_in, const T* x, const T* w_in, float bias, const float* out_in,
                             const float* lse, T* gx, float* gw_out, float* gb_out, int64_t B, int64_t N,
                             int64_t D, const int64_t* lengths) {
  const int64_t nc = chunks_per_row(B, N, D);
  const int64_t chunk = (N + nc - 1) / nc;
  std::vector<float> w(D), gw(B * nc * D), gb(B * nc);
  for (int64_t k = 0; k < D; ++k) w[k] = to_f(w_in[k]);
  at::parallel_for(0, B * nc, grain_for(2 * chunk * D), [&](int64_t begin, int64_t end) {
    std::vector<float> g(D), o(D), sg(kRows), ds(kRows), p(kRows), buf;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nc, n0 = (t % nc) * chunk, n1 = std::min(N, n0 + chunk);
      const int64_t real_end = std::max(n0, std::min(n1, real_tokens(lengths, b, N)));
      for (int64_t n = real_end; n < n1; ++n)  // padded tokens: no weight, no gradient
        std::fill(gx + (b * N + n) * D, gx + (b * N + n + 1) * D, static_cast<T>(0.f));
      for (int64_t k = 0; k < D; ++k) {
        g[k] = to_f(g_in[b * D + k]);
        o[k] = out_in[b * D + k];
      }
      float* pw = gw.data() + t * D;
      std::fill(pw, pw + D, 0.f);
      float pb = 0.f;
      for (int64_t n = n0; n < real_end; n += kRows) {
        const int64_t rows = std::min(kRows, real_end - n);
        const float* X = rows_f32(x + (b * N + n) * D, rows, D, buf);
        row_dots(X, rows, D, w.data(), sg.data());
        for (int64_t i = 0; i < rows; ++i) {
          // g.(x_n - out) in one sum: g.x_n - g.out would cancel (the two are close), costing ~5x the error
          const float* xi = X + i * D;
          float cd = 0.f;
#pragma omp simd reduction(+ : cd)
          for (int64_t k = 0; k < D; ++k) cd += g[k] * (xi[k] - o[k]);
          p[i] = std::exp(sg[i] + bias - lse[b]);
          ds[i] = p[i] * cd;
          pb += ds[i];
        }
        for (int64_t i = 0; i < rows; ++i) {
          T* grow = gx + (b * N + n + i) * D;
          const float pi = p[i], di = ds[i];
#pragma omp simd
          for (int64_t k = 0; k < D; ++k) grow[k] = static_cast<T>(pi * g[k] + di * w[k]);
        }
        add_weighted_rows(X, rows, D, ds.data(), pw);
      }
      gb[t] = pb;
    }
  });
  // Each row's ds sums to delta = g.(out_exact - out), 0 up to float32 rounding. The exactly centred ds_n - p_n delta
  // give dw - delta out and db = 0 (softmax is shift-invariant), written delta - delta so that a NaN row still
  // gives NaN, as the reference does.
  std::fill(gw_out, gw_out + D, 0.f);
  float db = 0.f;
  for (int64_t b = 0; b < B; ++b) {
    float delta = 0.f;
    for (int64_t c = 0; c < nc; ++c) delta += gb[b * nc + c];
    for (int64_t c = 0; c < nc; ++c) {
      const float* pw = gw.data() + (b * nc + c) * D;
#pragma omp simd
      for (int64_t k = 0; k < D; ++k) gw_out[k] += pw[k];
    }
    for (int64_t k = 0; k < D; ++k) gw_out[k] -= delta * out_in[b * D + k];
    db += delta - delta;
  }
  *gb_out = db;
}

void check_seqpool(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "seqpool: x must be a contiguous (B, N, D) tensor");
  TORCH_CHECK(weight.numel() == x.size(2) && bias.numel() == 1, "seqpool: weight (1, D) and bias (1,) expected");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type(),
              "seqpool: x, weight and bias must share a dtype");
  TORCH_CHECK(x.size(1) >= 1, "seqpool: N must be >= 1");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> seqpool_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       const at::Tensor& bias, const c10::optional<at::Tensor>& lengths) {
  check_seqpool(x, weight, bias);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  auto out = at::empty({B, D}, x.options().dtype(at::kFloat));
  auto lse = at::empty({B}, x.options().dtype(at::kFloat));
  const auto w = weight.contiguous();
  const float b = bias.item<float>();
  CCT_DISPATCH(x.scalar_type(), "seqpool_forward_cpu", [&] {
    seqpool_forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b, out.data_ptr<float>(),
                                     lse.data_ptr<float>(), B, N, D, lengths_data(lengths, B));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> seqpool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                    const at::Tensor& weight, const at::Tensor& bias,
                                                                    const at::Tensor& out, const at::Tensor& lse,
                                                                    const c10::optional<at::Tensor>& lengths) {
  check_seqpool(x, weight, bias);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  TORCH_CHECK(out.scalar_type() == at::kFloat, "seqpool_backward: out must be the forward's float32 output");
  const auto g = grad_out.contiguous(), o = out.contiguous(), w = weight.contiguous();
  const auto l = lse.to(at::kFloat).contiguous();
  auto gx = cached_empty(x.sizes(), x.options());
  auto gw = at::empty({D}, x.options().dtype(at::kFloat));
  auto gb = at::empty({1}, x.options().dtype(at::kFloat));
  const float b = bias.item<float>();
  CCT_DISPATCH(x.scalar_type(), "seqpool_backward_cpu", [&] {
    seqpool_backward_kernel<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b,
                                      o.data_ptr<float>(), l.data_ptr<float>(), gx.data_ptr<scalar_t>(),
                                      gw.data_ptr<float>(), gb.data_ptr<float>(), B, N, D, lengths_data(lengths, B));
  });
  return {gx, gw.view({1, D}).to(weight.scalar_type()), gb.to(bias.scalar_type())};
}

}  // namespace cct

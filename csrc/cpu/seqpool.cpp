// SeqPool on CPU: out[b] = sum_n softmax_n(x[b,n].w + bias) x[b,n], one pass over x from memory with an online
// softmax per block of rows (each block is read twice, the second time from L2).
// x (B, N, D) float32/float16/bfloat16 contiguous, weight (1, D), bias (1,); float32 accumulation.
// Parallel over batch rows, and over chunks of N when B is smaller than the thread count (partials merged after).
#include "common.h"
#include "cpu_ops.h"

namespace cct {
namespace {

// Number of N-chunks per batch row: 1 when the batch alone keeps every thread busy.
int64_t chunks_per_row(int64_t B, int64_t N, int64_t D) {
  const int64_t threads = at::get_num_threads();
  if (B == 0 || B >= threads || N * D < (1 << 18)) return 1;  // small rows: one thread, no team wake-up
  const int64_t want = (threads + B - 1) / B;
  return std::max<int64_t>(1, std::min<int64_t>(want, N / 32));
}

constexpr int64_t kRows = 64;  // rows per GEMV block: 64 x D floats stay in L2 between the two passes

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

// Per block of kRows rows: scores s = X w (BLAS GEMV), one online-softmax rescale per block, acc += X^T e (GEMV):
// x is read from memory once (the block is re-read from L2), and the dot products run at BLAS speed.
template <typename T>
void seqpool_forward_kernel(const T* x, const T* w_in, float bias, T* out, float* lse, int64_t B, int64_t N,
                            int64_t D) {
  const int64_t nc = chunks_per_row(B, N, D);
  const int64_t chunk = (N + nc - 1) / nc;
  std::vector<float> w(D), m(B * nc), z(B * nc), acc(B * nc * D);
  for (int64_t k = 0; k < D; ++k) w[k] = to_f(w_in[k]);
  at::parallel_for(0, B * nc, grain_for(chunk * D), [&](int64_t begin, int64_t end) {
    std::vector<float> buf, e(kRows);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nc, n0 = (t % nc) * chunk, n1 = std::min(N, n0 + chunk);
      float* a = acc.data() + t * D;
      std::fill(a, a + D, 0.f);
      float mx = -INFINITY, sum = 0.f;
      for (int64_t n = n0; n < n1; n += kRows) {
        const int64_t rows = std::min(kRows, n1 - n);
        const float* X = rows_f32(x + (b * N + n) * D, rows, D, buf);
        gemm_rm(false, false, (int)rows, 1, (int)D, 1.f, X, (int)D, w.data(), 1, 0.f, e.data(), 1);
        float bm = -INFINITY;
        for (int64_t i = 0; i < rows; ++i) bm = std::max(bm, e[i] + bias);
        if (bm > mx) {  // new running max: rescale what was accumulated
          const float r = std::exp(mx - bm);
          sum *= r;
#pragma omp simd
          for (int64_t k = 0; k < D; ++k) a[k] *= r;
          mx = bm;
        }
        for (int64_t i = 0; i < rows; ++i) {
          e[i] = std::exp(e[i] + bias - mx);
          sum += e[i];
        }
        gemm_rm(true, false, (int)D, 1, (int)rows, 1.f, X, (int)D, e.data(), 1, 1.f, a, 1);
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
      const float inv = 1.f / Z;
      for (int64_t k = 0; k < D; ++k) out[b * D + k] = static_cast<T>(o[k] * inv);
      lse[b] = M + std::log(Z);
    }
  });
}

// p_n = exp(s_n - lse); ds_n = p_n (g.x_n - g.out); dx_n = p_n g + ds_n w; dw = sum ds_n x_n; db = sum ds_n.
// Per block: s = X w (BLAS GEMV), g.(x_n - out) per row, the rank-2 row update, dw += X^T ds (GEMV).
template <typename T>
void seqpool_backward_kernel(const T* g_in, const T* x, const T* w_in, float bias, const T* out_in,
                             const float* lse, T* gx, float* gw_out, float* gb_out, int64_t B, int64_t N,
                             int64_t D) {
  const int64_t nc = chunks_per_row(B, N, D);
  const int64_t chunk = (N + nc - 1) / nc;
  std::vector<float> w(D), gw(B * nc * D), gb(B * nc);
  for (int64_t k = 0; k < D; ++k) w[k] = to_f(w_in[k]);
  at::parallel_for(0, B * nc, grain_for(2 * chunk * D), [&](int64_t begin, int64_t end) {
    std::vector<float> g(D), o(D), sg(kRows), ds(kRows), p(kRows), buf;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nc, n0 = (t % nc) * chunk, n1 = std::min(N, n0 + chunk);
      for (int64_t k = 0; k < D; ++k) {
        g[k] = to_f(g_in[b * D + k]);
        o[k] = to_f(out_in[b * D + k]);
      }
      float* pw = gw.data() + t * D;
      std::fill(pw, pw + D, 0.f);
      float pb = 0.f;
      for (int64_t n = n0; n < n1; n += kRows) {
        const int64_t rows = std::min(kRows, n1 - n);
        const float* X = rows_f32(x + (b * N + n) * D, rows, D, buf);
        gemm_rm(false, false, (int)rows, 1, (int)D, 1.f, X, (int)D, w.data(), 1, 0.f, sg.data(), 1);
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
        gemm_rm(true, false, (int)D, 1, (int)rows, 1.f, X, (int)D, ds.data(), 1, 1.f, pw, 1);
      }
      gb[t] = pb;
    }
  });
  std::fill(gw_out, gw_out + D, 0.f);
  float db = 0.f;
  for (int64_t t = 0; t < B * nc; ++t) {
    const float* pw = gw.data() + t * D;
#pragma omp simd
    for (int64_t k = 0; k < D; ++k) gw_out[k] += pw[k];
    db += gb[t];
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
                                                       const at::Tensor& bias) {
  check_seqpool(x, weight, bias);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  auto out = at::empty({B, D}, x.options());
  auto lse = at::empty({B}, x.options().dtype(at::kFloat));
  const auto w = weight.contiguous();
  const float b = bias.item<float>();
  CCT_DISPATCH(x.scalar_type(), "seqpool_forward_cpu", [&] {
    seqpool_forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b, out.data_ptr<scalar_t>(),
                                     lse.data_ptr<float>(), B, N, D);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> seqpool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                    const at::Tensor& weight, const at::Tensor& bias,
                                                                    const at::Tensor& out, const at::Tensor& lse) {
  check_seqpool(x, weight, bias);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const auto g = grad_out.contiguous(), o = out.contiguous(), w = weight.contiguous();
  const auto l = lse.to(at::kFloat).contiguous();
  auto gx = at::empty_like(x);
  auto gw = at::empty({D}, x.options().dtype(at::kFloat));
  auto gb = at::empty({1}, x.options().dtype(at::kFloat));
  const float b = bias.item<float>();
  CCT_DISPATCH(x.scalar_type(), "seqpool_backward_cpu", [&] {
    seqpool_backward_kernel<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), b,
                                      o.data_ptr<scalar_t>(), l.data_ptr<float>(), gx.data_ptr<scalar_t>(),
                                      gw.data_ptr<float>(), gb.data_ptr<float>(), B, N, D);
  });
  return {gx, gw.view({1, D}).to(weight.scalar_type()), gb.to(bias.scalar_type())};
}

}  // namespace cct

// Linear with its epilogue on CPU: out = act(x W^T + b) * row_scale + residual, x (M, K), W (N, K), float32, float16
// or bfloat16 (computed in float32). One GEMM over all rows on torch's BLAS (MKL sgemm on x86-64, all threads: MKL
// packs W once), then one parallel pass applies the whole epilogue (bias, exact GELU, row scale, residual, the
// cast) row by row, each row in L1: where ATen runs addmm (a bias copy, then the GEMM) and a pass per elementwise
// op, this is the GEMM and a single pass. Per-block GEMMs with the epilogue on L2-resident tiles were measured
// slower here (each block's sgemm repacks W, and one thread per block runs MKL below its two-thread rate).
// The backward's GELU input h = x W^T + b is written only when asked for (save_pre_activation).
#include "common.h"
#include "cpu_ops.h"
#include "output_cache.h"

#include <vector>

namespace cct {
namespace {

// erf(x) as a rational function on [-4, 4] (an odd degree-13 numerator over an even degree-8 denominator: the
// float32 minimax fit Eigen and XLA use; |erf(x)| rounds to 1 beyond 4). Absolute error 3.3e-7 over [-8, 8] in
// float32 against float64 erf, and no exp: ~1.9x faster per element than the Abramowitz-Stegun 7.1.26 formula with
// its exp (5.1e-7 in float32) that this replaced (NOTES.md, cpu extension, fifth round). Branch free: vectorises.
inline float erf_approx(float x) {
  x = x > 4.f ? 4.f : x;
  x = x < -4.f ? -4.f : x;
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

// One output row: a = x W^T (float32, in L1), then bias, h, GELU, residual, the cast, each a vectorised loop over
// the row (one loop with all the optional steps inside does not vectorise).
template <typename T>
void epilogue_row(float* a, T* out, T* pre, const T* residual, const T* bias, const T* row_scale, int64_t row,
                  int64_t N, bool gelu) {
  if (bias) {
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) a[c] += to_f(bias[c]);
  }
  if (pre) {
    T* h = pre + row * N;
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) h[c] = static_cast<T>(a[c]);
  }
  if (gelu) {
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) a[c] = 0.5f * a[c] * (1.f + erf_approx(a[c] * 0.70710678118654752f));
  }
  T* o = out + row * N;
  const float scale = row_scale ? to_f(row_scale[row]) : 1.f;
  if (residual) {
    const T* res = residual + row * N;
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) o[c] = static_cast<T>(a[c] * scale + to_f(res[c]));
  } else if (row_scale) {
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) o[c] = static_cast<T>(a[c] * scale);
  } else if (!std::is_same_v<T, float>) {
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) o[c] = static_cast<T>(a[c]);
  }
}

template <typename T>
void linear_kernel(const T* x, const T* w, const T* bias, const T* residual, const T* row_scale, T* out, T* pre,
                   int64_t M, int64_t N, int64_t K, bool gelu) {
  constexpr bool f32 = std::is_same_v<T, float>;
  std::vector<float> x32, w32, tile;  // 16-bit operands widened once, the product kept in float32
  const float *xf = nullptr, *wf = nullptr;
  float* acc = nullptr;
  if constexpr (f32) {
    xf = x;
    wf = w;
    acc = out;  // float32: the GEMM writes the output, the epilogue rewrites it in place
  } else {
    x32.resize(M * K);
    w32.resize(N * K);
    tile.resize(M * N);
    at::parallel_for(0, M * K, at::internal::GRAIN_SIZE, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) x32[i] = to_f(x[i]);
    });
    for (int64_t i = 0; i < N * K; ++i) w32[i] = to_f(w[i]);
    xf = x32.data();
    wf = w32.data();
    acc = tile.data();
  }
  gemm_rm(false, true, (int)M, (int)N, (int)K, 1.f, xf, (int)K, wf, (int)K, 0.f, acc, (int)N);
  at::parallel_for(0, M, grain_for(N), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) epilogue_row(acc + r * N, out, pre, residual, bias, row_scale, r, N, gelu);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                      const c10::optional<at::Tensor>& bias,
                                                      const c10::optional<at::Tensor>& residual, bool gelu,
                                                      bool save_pre_activation,
                                                      const c10::optional<at::Tensor>& row_scale) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear_forward: x (M, K) and weight (N, K) expected, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "linear_forward: x and weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  for (const auto* t : {&bias, &residual, &row_scale}) {
    TORCH_CHECK(!t->has_value() || ((*t)->is_contiguous() && (*t)->scalar_type() == x.scalar_type()),
                "linear_forward: bias, residual and row_scale must be contiguous and of x's dtype");
  }
  TORCH_CHECK(!row_scale.has_value() || row_scale->numel() == M, "linear_forward: row_scale must hold M values");
  TORCH_CHECK(!bias.has_value() || bias->numel() == N, "linear_forward: bias must hold N = ", N, " values");
  TORCH_CHECK(!residual.has_value() || residual->sizes() == at::IntArrayRef({M, N}),
              "linear_forward: residual must be (M, N)");
  auto out = cached_empty({M, N}, x.options());
  const bool keep = gelu && save_pre_activation;
  auto pre = keep ? cached_empty({M, N}, x.options()) : at::empty({0}, x.options());
  if (M == 0) return {out, pre};
  CCT_DISPATCH(x.scalar_type(), "linear_forward_cpu", [&] {
    linear_kernel<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                            bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                            residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr,
                            row_scale.has_value() ? row_scale->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                            keep ? pre.data_ptr<scalar_t>() : nullptr, M, N, K, gelu);
  });
  return {out, pre};
}

}  // namespace cct

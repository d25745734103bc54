// Linear with its epilogue on CPU: out = dropout(act(x W^T + b)) * row_scale + residual, x (M, K), W (N, K),
// float32, float16 or bfloat16 (computed in float32), then a LayerNorm of each output row when asked. One GEMM over
// all rows on torch's BLAS (MKL sgemm on x86-64, all threads: MKL packs W once per call; a frozen weight's copy packed
// once for M rows, frozen_weights.h, up to kPackedMaxRows), then one parallel pass applies the
// whole epilogue (bias, exact GELU, dropout, row scale, residual, the cast, the LayerNorm) row by row, each row in
// L1: where ATen runs addmm (a bias copy, then the GEMM) and a pass per elementwise op, this is the GEMM and a single
// pass. Per-block GEMMs with the epilogue on L2-resident tiles were measured
// slower here (each block's sgemm repacks W, and one thread per block runs MKL below its two-thread rate).
// The backward's inputs are written only when asked for (save_for_backward): GELU's input h = x W^T + b, or the sum
// that the optional LayerNorm normalises (with its per-row mean and 1 / std, always written). Dropout keeps
// element (r, c) iff dropout_bits(dropout_key(seed, r), c) >= threshold (common.h; the definition, in torch ops, is
// cct_kernels.reference.linear_dropout_mask): no mask is stored, the backward's pass redraws it.
#include "common.h"
#include "cpu_ops.h"
#include "frozen_weights.h"
#include "output_cache.h"

#include <vector>

namespace cct {
namespace {

constexpr int64_t kPackedMaxRows = 4096;

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

inline float gelu(float h) { return 0.5f * h * (1.f + erf_approx(h * 0.70710678118654752f)); }

// d GELU(h) / dh = Phi(h) + h phi(h); exp_approx, not std::exp, so that the loops over it vectorise (std::exp kept
// the backward's GELU pass scalar: 7.2 ms at 4096 x 600 against ATen's 0.89 ms; NOTES.md, cpu extension, eighth round)
inline float gelu_grad(float h) {
  return 0.5f * (1.f + erf_approx(h * 0.70710678118654752f)) + h * 0.3989422804014327f * exp_approx(-0.5f * h * h);
}

// Dropout's scale of row `row` in place: kept values times 1 / (1 - p), dropped ones 0.
struct Dropout {
  int64_t seed = 0;
  uint32_t threshold = 0;
  float inv_keep = 1.f;
  bool active = false;

  Dropout(double p, const c10::optional<at::Tensor>& seed_tensor) {
    TORCH_CHECK(p >= 0 && p <= 1, "linear: dropout_p must be in [0, 1], got ", p);
    TORCH_CHECK(p == 0 || (seed_tensor.has_value() && seed_tensor->numel() == 1),
                "linear: dropout needs a seed tensor of one int64");
    active = p > 0;
    if (active) {
      seed = seed_value(*seed_tensor, p);
      threshold = dropout_threshold(p);
      inv_keep = p < 1 ? (float)(1.0 / (1.0 - p)) : 0.f;
    }
  }

  // Locals and a 32-bit column counter: with the members read through `this` and an int64 counter the loop ran
  // ~8 cycles an element (14 ms of dropout at 16384 x 512 on two threads; now ~1 ms).
  void apply(float* a, int64_t row, int64_t N) const {
    const uint32_t key = dropout_key(seed, row), thr = threshold, n = (uint32_t)N;
    const float scale = inv_keep;
#pragma omp simd
    for (uint32_t c = 0; c < n; ++c) a[c] = dropout_bits(key, c) >= thr ? a[c] * scale : 0.f;
  }
};

// out = (in - mean) * rstd * weight + bias over one row of N (in may be out).
template <typename T>
inline void normalise_row(const T* in, T* out, float mean, float rstd, const T* weight, const T* bias, int64_t N) {
#pragma omp simd
  for (int64_t c = 0; c < N; ++c) {
    const float normed = (to_f(in[c]) - mean) * rstd * to_f(weight[c]);
    out[c] = static_cast<T>(bias ? normed + to_f(bias[c]) : normed);
  }
}

// The LayerNorm over each output row that follows the residual add (the encoder block's proj + norm1).
template <typename T>
struct RowNorm {
  const T* weight = nullptr;  // nullptr: no LayerNorm
  const T* bias = nullptr;
  float eps = 1e-5f;
  float* stats = nullptr;  // (2, M): mean, then 1 / sqrt(var + eps), for the backward
  T* sum = nullptr;        // (M, N): the normalised sum itself when the backward needs it, else nullptr

  // Row r of out holds the sum (rounded to T, as the reference's tensor is); replace it by its LayerNorm.
  void apply(T* o, int64_t row, int64_t M, int64_t N) const {
    if (sum) std::copy(o, o + N, sum + row * N);
    float mean = 0.f, var = 0.f;
#pragma omp simd reduction(+ : mean)
    for (int64_t c = 0; c < N; ++c) mean += to_f(o[c]);
    mean /= (float)N;
#pragma omp simd reduction(+ : var)
    for (int64_t c = 0; c < N; ++c) var += (to_f(o[c]) - mean) * (to_f(o[c]) - mean);
    const float rstd = 1.f / std::sqrt(var / (float)N + eps);
    normalise_row(o, o, mean, rstd, weight, bias, N);
    stats[row] = mean;
    stats[M + row] = rstd;
  }
};

// One output row: a = x W^T (float32, in L1), then bias, h, GELU, dropout, residual, the cast, the LayerNorm, each a
// vectorised loop over the row (one loop with all the optional steps inside does not vectorise).
template <typename T>
void epilogue_row(float* a, T* out, T* pre, const T* residual, const T* bias, const T* row_scale, int64_t row,
                  int64_t M, int64_t N, bool gelu_on, const Dropout& dropout, const RowNorm<T>& norm) {
  if (bias) {
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) a[c] += to_f(bias[c]);
  }
  if (pre) {
    T* h = pre + row * N;
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) h[c] = static_cast<T>(a[c]);
  }
  if (gelu_on) {
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) a[c] = gelu(a[c]);
  }
  if (dropout.active) dropout.apply(a, row, N);
  T* o = out + row * N;
  const float scale = row_scale ? to_f(row_scale[row]) : 1.f;
  if (residual) {
    const T* res = residual + row * N;
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) o[c] = static_cast<T>(a[c] * scale + to_f(res[c]));
  } else if (row_scale) {
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) o[c] = static_cast<T>(a[c] * scale);
  } else if (!std::is_same_v<T, float>) {  // float32: a is the output row already
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) o[c] = static_cast<T>(a[c]);
  }
  if (norm.weight) norm.apply(o, row, M, N);
}

// packed: W frozen (frozen_weights.h), or undefined.
template <typename T>
void linear_kernel(const T* x, const T* w, const at::Tensor& packed, const T* bias, const T* residual,
                   const T* row_scale, T* out, T* pre, int64_t M, int64_t N, int64_t K, bool gelu_on,
                   const Dropout& dropout, const RowNorm<T>& norm) {
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
  if (f32 && packed.defined())
    packed_gemm(packed, xf, acc, (int)M, (int)N, (int)K);
  else
    gemm_rm(false, true, (int)M, (int)N, (int)K, 1.f, xf, (int)K, wf, (int)K, 0.f, acc, (int)N);
  at::parallel_for(0, M, grain_for(N), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      epilogue_row(acc + r * N, out, pre, residual, bias, row_scale, r, M, N, gelu_on, dropout, norm);
  });
}

// grad_h = grad_out * row_scale * dropout's mask and scale * GELU'(h) (each step optional), row by row in L1.
template <typename T>
void grad_pre_activation_kernel(const T* g, const T* h, const T* row_scale, T* grad_h, int64_t M, int64_t N,
                                const Dropout& dropout) {
  at::parallel_for(0, M, grain_for(N), [&](int64_t begin, int64_t end) {
    std::vector<float> a(N);
    for (int64_t r = begin; r < end; ++r) {
      const float s = row_scale ? to_f(row_scale[r]) : 1.f;
      const T* g_row = g + r * N;
#pragma omp simd
      for (int64_t c = 0; c < N; ++c) a[c] = to_f(g_row[c]) * s;
      if (dropout.active) dropout.apply(a.data(), r, N);
      if (h) {
        const T* h_row = h + r * N;
#pragma omp simd
        for (int64_t c = 0; c < N; ++c) a[c] *= gelu_grad(to_f(h_row[c]));
      }
      T* out = grad_h + r * N;
#pragma omp simd
      for (int64_t c = 0; c < N; ++c) out[c] = static_cast<T>(a[c]);
    }
  });
}

// Rows of x normalised with given statistics: (x - mean) * rstd * weight + bias, one pass (the backward's copy of a
// LayerNorm prologue's output, from the forward's statistics).
template <typename T>
void normalise_rows_kernel(const T* x, const float* stats, const T* weight, const T* bias, T* out, int64_t M,
                           int64_t K) {
  at::parallel_for(0, M, grain_for(K), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      normalise_row(x + r * K, out + r * K, stats[r], stats[M + r], weight, bias, K);
  });
}

}  // namespace

at::Tensor normalise_rows_cpu(const at::Tensor& x, const at::Tensor& stats, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "normalise_rows: x must be a contiguous (M, K) tensor");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.numel() == 2 * M,
              "normalise_rows: stats must be a contiguous (2, M) float32 tensor");
  TORCH_CHECK(weight.numel() == K && weight.is_contiguous() && weight.scalar_type() == x.scalar_type() &&
              (!bias.has_value() || (bias->numel() == K && bias->is_contiguous() &&
                                     bias->scalar_type() == x.scalar_type())),
              "normalise_rows: weight and bias must be K contiguous values of x's dtype");
  auto out = at::empty_like(x);
  CCT_DISPATCH(x.scalar_type(), "normalise_rows_cpu", [&] {
    normalise_rows_kernel<scalar_t>(x.data_ptr<scalar_t>(), stats.data_ptr<float>(), weight.data_ptr<scalar_t>(),
                                    bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                                    out.data_ptr<scalar_t>(), M, K);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, bool gelu, bool save_for_backward,
    const c10::optional<at::Tensor>& row_scale, double dropout_p, const c10::optional<at::Tensor>& seed,
    const c10::optional<at::Tensor>& norm_weight, const c10::optional<at::Tensor>& norm_bias, double norm_eps) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear_forward: x (M, K) and weight (N, K) expected, got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "linear_forward: x and weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  for (const auto* t : {&bias, &residual, &row_scale, &norm_weight, &norm_bias}) {
    TORCH_CHECK(!t->has_value() || ((*t)->is_contiguous() && (*t)->scalar_type() == x.scalar_type()),
                "linear_forward: bias, residual, row_scale and the norm's weight and bias must be contiguous and of "
                "x's dtype");
  }
  TORCH_CHECK(!row_scale.has_value() || row_scale->numel() == M, "linear_forward: row_scale must hold M values");
  for (const auto* t : {&bias, &norm_weight, &norm_bias}) {
    TORCH_CHECK(!t->has_value() || (*t)->numel() == N, "linear_forward: bias and the norm's weight and bias must "
                "hold N = ", N, " values");
  }
  TORCH_CHECK(!residual.has_value() || residual->sizes() == at::IntArrayRef({M, N}),
              "linear_forward: residual must be (M, N)");
  const bool norm = norm_weight.has_value();
  TORCH_CHECK(!(norm && gelu), "linear_forward: the LayerNorm epilogue follows no activation (gelu must be false)");
  TORCH_CHECK(norm || !norm_bias.has_value(), "linear_forward: norm_bias without norm_weight");
  TORCH_CHECK(!norm || norm_eps > 0, "linear_forward: norm_eps must be positive");
  const Dropout dropout(dropout_p, seed);
  auto out = cached_empty({M, N}, x.options());
  const bool keep = save_for_backward && (gelu || norm);  // GELU's input h, or the sum the LayerNorm normalises
  auto saved = keep ? cached_empty({M, N}, x.options()) : at::empty({0}, x.options());
  auto stats = norm ? at::empty({2, M}, x.options().dtype(at::kFloat)) : at::empty({0}, x.options().dtype(at::kFloat));
  if (M == 0) return {out, saved, stats};
  // A frozen weight's packed copy pays where packing W is a large part of the GEMM: few rows (NOTES.md, cpu
  // extension, ninth round).
  const at::Tensor packed = M <= kPackedMaxRows ? frozen_packed_gemm_weight(weight, M) : at::Tensor();
  CCT_DISPATCH(x.scalar_type(), "linear_forward_cpu", [&] {
    RowNorm<scalar_t> row_norm;
    if (norm) {
      row_norm.weight = norm_weight->data_ptr<scalar_t>();
      row_norm.bias = norm_bias.has_value() ? norm_bias->data_ptr<scalar_t>() : nullptr;
      row_norm.eps = (float)norm_eps;
      row_norm.stats = stats.data_ptr<float>();
      row_norm.sum = keep ? saved.data_ptr<scalar_t>() : nullptr;
    }
    linear_kernel<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), packed,
                            bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                            residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr,
                            row_scale.has_value() ? row_scale->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                            keep && gelu ? saved.data_ptr<scalar_t>() : nullptr, M, N, K, gelu, dropout, row_norm);
  });
  return {out, saved, stats};
}

at::Tensor linear_grad_pre_activation_cpu(const at::Tensor& grad_out, const c10::optional<at::Tensor>& pre_activation,
                                          const c10::optional<at::Tensor>& row_scale, double dropout_p,
                                          const c10::optional<at::Tensor>& seed) {
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.is_contiguous(), "linear_grad_pre_activation: grad_out must be a "
              "contiguous (M, N) tensor, got ", grad_out.sizes());
  const int64_t M = grad_out.size(0), N = grad_out.size(1);
  TORCH_CHECK(!pre_activation.has_value() || (pre_activation->sizes() == grad_out.sizes() &&
              pre_activation->is_contiguous() && pre_activation->scalar_type() == grad_out.scalar_type()),
              "linear_grad_pre_activation: pre_activation must be a contiguous (M, N) tensor of grad_out's dtype");
  TORCH_CHECK(!row_scale.has_value() || (row_scale->numel() == M && row_scale->is_contiguous() &&
              row_scale->scalar_type() == grad_out.scalar_type()),
              "linear_grad_pre_activation: row_scale must be M contiguous values of grad_out's dtype");
  const Dropout dropout(dropout_p, seed);
  auto grad_h = at::empty_like(grad_out);
  CCT_DISPATCH(grad_out.scalar_type(), "linear_grad_pre_activation_cpu", [&] {
    grad_pre_activation_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(),
                                         pre_activation.has_value() ? pre_activation->data_ptr<scalar_t>() : nullptr,
                                         row_scale.has_value() ? row_scale->data_ptr<scalar_t>() : nullptr,
                                         grad_h.data_ptr<scalar_t>(), M, N, dropout);
  });
  return grad_h;
}

}  // namespace cct

// Multi-head self-attention on CPU straight from the packed qkv (B, N, 3*H*d) to (B, N, H*d), heads merged.
// Per (batch, head, block of kBM query rows) one thread computes S = scale Q K^T for whole rows (kBM x N floats,
// L2-resident for N <= ~1k), an exact row softmax (no online rescaling needed), optional dropout from a
// counter-based hash of (seed, b*H+h, i*N+j), and O = P V written into the merged-heads output. The GEMMs read
// qkv in place through leading dimensions (no permute copies); float16/bfloat16 panels are widened to float32.
// lse (B, H, N) float32 = logsumexp of the scaled scores: the backward recomputes P = exp(S - lse) from it.
// Key padding: with lengths (B,) int64, sequence b has lengths[b] real keys (a prefix); every query attends to those
// only, so the GEMMs and the softmax run over L = lengths[b] columns (padding costs nothing). L = 0 gives zeros.
// Limits: N * kBM floats of scratch per thread, N < 65536 (dropout index is 32-bit per (b, h)).
#include "common.h"
#include "cpu_ops.h"
#include "output_cache.h"

namespace cct {
namespace {

// Query rows per task. The S block (kBM x N floats, 590 KB at N = 577) stays in L2; 256 rows ran 15-20% faster
// than 64 at CCT's shapes (fewer, larger GEMMs, K packed once per (b, h); NOTES.md, cpu extension, fifth round).
constexpr int64_t kBM = 256;

// A (rows x d) panel of q, k or v (or grad/out) as float32 rows: in place for float32, widened otherwise.
template <typename T>
struct Panel {
  const float* ptr = nullptr;
  int ld = 0;
  std::vector<float> buf;
  void load(const T* src, int64_t rows, int64_t d, int64_t src_ld) {
    if constexpr (std::is_same_v<T, float>) {
      ptr = src;
      ld = (int)src_ld;
    } else {
      buf.resize(rows * d);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < d; ++k) buf[r * d + k] = to_f(src[r * src_ld + k]);
      ptr = buf.data();
      ld = (int)d;
    }
  }
};

template <typename T>
void attention_forward_kernel(const T* qkv, T* out, float* lse, int64_t B, int64_t N, int64_t H, int64_t d,
                              float scale, double p, int64_t seed, const int64_t* lengths) {
  const int64_t D = H * d, ld = 3 * D, nqb = (N + kBM - 1) / kBM;
  const uint32_t thr = dropout_threshold(p);
  const float keep_scale = p > 0 ? (float)(1.0 / (1.0 - p)) : 1.f;
  at::parallel_for(0, B * H * nqb, grain_for(kBM * N * d), [&](int64_t begin, int64_t end) {
    std::vector<float> S(kBM * N), O, row_scale(kBM);
    Panel<T> q, k, v;
    int64_t loaded_bh = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, b = bh / H, h = bh % H, i0 = (t % nqb) * kBM, m = std::min(kBM, N - i0);
      const int64_t L = real_tokens(lengths, b, N);
      T* o = out + (b * N + i0) * D + h * d;
      if (L == 0) {  // no real key: zeros, and lse = -inf marks the rows for the backward
        for (int64_t r = 0; r < m; ++r) {
          std::fill(o + r * D, o + r * D + d, static_cast<T>(0.f));
          lse[bh * N + i0 + r] = -INFINITY;
        }
        continue;
      }
      const T* base = qkv + b * N * ld + h * d;
      if (bh != loaded_bh) {  // consecutive tasks share (b, h): widen K and V once
        k.load(base + D, L, d, ld);
        v.load(base + 2 * D, L, d, ld);
        loaded_bh = bh;
      }
      q.load(base + i0 * ld, m, d, ld);
      gemm_rm(false, true, m, L, d, scale, q.ptr, q.ld, k.ptr, k.ld, 0.f, S.data(), L);
      const uint32_t key = dropout_key(seed, bh);
      for (int64_t r = 0; r < m; ++r) {
        float* row = S.data() + r * L;
        float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < L; ++j) mx = row[j] > mx ? row[j] : mx;
        float sum = 0.f;
        if (thr == 0) {
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < L; ++j) {
            const float e = exp_approx(row[j] - mx);
            row[j] = e;
            sum += e;
          }
        } else {  // the sum runs over all probabilities; only the ones multiplying V are dropped
          // The mask's index stays i*N+j whatever L is. Locals and a 32-bit counter: with the lambda's captures and
          // an int64 counter gcc left the dropout loops scalar (the backward's cost 78% more than without dropout).
          const uint32_t rb = (uint32_t)((i0 + r) * N), k32 = key, t32 = thr, n32 = (uint32_t)L;
#pragma omp simd reduction(+ : sum)
          for (uint32_t j = 0; j < n32; ++j) {
            const float e = exp_approx(row[j] - mx);
            row[j] = dropout_bits(k32, rb + j) >= t32 ? e : 0.f;
            sum += e;
          }
        }
        row_scale[r] = keep_scale / sum;  // normalisation applied to the m x d output, not the m x N weights
        lse[bh * N + i0 + r] = mx + std::log(sum);
      }
      float* o32;
      int64_t ldo;
      if constexpr (std::is_same_v<T, float>) {
        o32 = out + (b * N + i0) * D + h * d;
        ldo = D;
      } else {
        O.resize(m * d);
        o32 = O.data();
        ldo = d;
      }
      gemm_rm(false, false, m, d, L, 1.f, S.data(), L, v.ptr, v.ld, 0.f, o32, ldo);
      for (int64_t r = 0; r < m; ++r) {
        const float sc = row_scale[r];
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[r * D + c] = static_cast<T>(o32[r * ldo + c] * sc);
      }
    }
  });
}

// One thread per (b, h): dK and dV accumulate over all query blocks.
//   P = exp(S - lse), Pd = P * mask / (1-p); dV += Pd^T dO; dPd = dO V^T; dS = P * (dPd * mask / (1-p) - Di)
//   with Di = rowsum(dO * O); dQ = scale dS K; dK += scale dS^T Q.
template <typename T>
void attention_backward_kernel(const T* gout, const T* qkv, const T* out, const float* lse, T* gqkv, int64_t B,
                               int64_t N, int64_t H, int64_t d, float scale, double p, int64_t seed,
                               const int64_t* lengths) {
  const int64_t D = H * d, ld = 3 * D;
  const uint32_t thr = dropout_threshold(p);
  const float keep_scale = p > 0 ? (float)(1.0 / (1.0 - p)) : 1.f;
  at::parallel_for(0, B * H, grain_for(N * N * d), [&](int64_t begin, int64_t end) {
    std::vector<float> P(kBM * N), dP(kBM * N), Di(kBM), dK, dV, dQ;
    constexpr bool f32 = std::is_same_v<T, float>;
    if (!f32) {
      dK.resize(N * d);
      dV.resize(N * d);
      dQ.resize(kBM * d);
    }
    Panel<T> q, k, v, go;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, L = real_tokens(lengths, b, N);
      const T* base = qkv + b * N * ld + h * d;
      T* gbase = gqkv + b * N * ld + h * d;
      for (int64_t n = L; n < N; ++n)  // padded keys get no gradient; rows < L are written below
        for (int64_t c = 0; c < d; ++c) {
          gbase[n * ld + D + c] = static_cast<T>(0.f);
          gbase[n * ld + 2 * D + c] = static_cast<T>(0.f);
        }
      if (L == 0) {
        for (int64_t n = 0; n < N; ++n) std::fill(gbase + n * ld, gbase + n * ld + d, static_cast<T>(0.f));
        continue;
      }
      k.load(base + D, L, d, ld);
      v.load(base + 2 * D, L, d, ld);
      float* dk = f32 ? reinterpret_cast<float*>(gbase + D) : dK.data();
      float* dv = f32 ? reinterpret_cast<float*>(gbase + 2 * D) : dV.data();
      const int ldkv = f32 ? (int)ld : (int)d;
      const uint32_t key = dropout_key(seed, bh);
      for (int64_t i0 = 0; i0 < N; i0 += kBM) {
        const int64_t m = std::min(kBM, N - i0);
        q.load(base + i0 * ld, m, d, ld);
        go.load(gout + (b * N + i0) * D + h * d, m, d, D);
        const T* o = out + (b * N + i0) * D + h * d;
        for (int64_t r = 0; r < m; ++r) {
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t c = 0; c < d; ++c) s += go.ptr[r * go.ld + c] * to_f(o[r * D + c]);
          Di[r] = s;
        }
        gemm_rm(false, true, m, L, d, scale, q.ptr, q.ld, k.ptr, k.ld, 0.f, P.data(), L);
        gemm_rm(false, true, m, L, d, 1.f, go.ptr, go.ld, v.ptr, v.ld, 0.f, dP.data(), L);
        for (int64_t r = 0; r < m; ++r) {
          float* pr = P.data() + r * L;
          float* dr = dP.data() + r * L;
          const float l = lse[bh * N + i0 + r], di = Di[r];
          if (thr == 0) {
#pragma omp simd
            for (int64_t j = 0; j < L; ++j) {
              const float pj = exp_approx(pr[j] - l);
              pr[j] = pj;
              dr[j] = pj * (dr[j] - di);
            }
          } else {  // locals and a 32-bit counter keep this loop vectorised (see the forward)
            const uint32_t rb = (uint32_t)((i0 + r) * N), k32 = key, t32 = thr, n32 = (uint32_t)L;
            const float ks = keep_scale;
#pragma omp simd
            for (uint32_t j = 0; j < n32; ++j) {
              const float pj = exp_approx(pr[j] - l);
              const float keep = dropout_bits(k32, rb + j) >= t32 ? ks : 0.f;
              pr[j] = pj * keep;  // the dropped probabilities that multiplied V
              dr[j] = pj * (dr[j] * keep - di);
            }
          }
        }
        const float beta = i0 == 0 ? 0.f : 1.f;
        gemm_rm(true, false, L, d, m, 1.f, P.data(), L, go.ptr, go.ld, beta, dv, ldkv);
        gemm_rm(true, false, L, d, m, scale, dP.data(), L, q.ptr, q.ld, beta, dk, ldkv);
        if constexpr (f32) {
          gemm_rm(false, false, m, d, L, scale, dP.data(), L, k.ptr, k.ld, 0.f,
                  reinterpret_cast<float*>(gbase + i0 * ld), ld);
        } else {
          gemm_rm(false, false, m, d, L, scale, dP.data(), L, k.ptr, k.ld, 0.f, dQ.data(), d);
          for (int64_t r = 0; r < m; ++r)
            for (int64_t c = 0; c < d; ++c) gbase[(i0 + r) * ld + c] = static_cast<T>(dQ[r * d + c]);
        }
      }
      if constexpr (!f32) {
        for (int64_t n = 0; n < L; ++n)
          for (int64_t c = 0; c < d; ++c) {
            gbase[n * ld + D + c] = static_cast<T>(dK[n * d + c]);
            gbase[n * ld + 2 * D + c] = static_cast<T>(dV[n * d + c]);
          }
      }
    }
  });
}

void check_attention(const at::Tensor& qkv, int64_t num_heads, double dropout_p, const at::Tensor& seed) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous(), "attention: qkv must be a contiguous (B, N, 3*H*d) tensor");
  TORCH_CHECK(num_heads >= 1 && qkv.size(2) % (3 * num_heads) == 0, "attention: qkv's last dim must be 3*H*d");
  TORCH_CHECK(qkv.size(1) < 65536, "attention: N must be < 65536");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "attention: dropout_p must be in [0, 1)");
  TORCH_CHECK(dropout_p == 0 || seed.numel() == 1, "attention: dropout needs a seed tensor of one int64");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& qkv, int64_t num_heads, double scale,
                                                         double dropout_p, const at::Tensor& seed,
                                                         const c10::optional<at::Tensor>& lengths) {
  check_attention(qkv, num_heads, dropout_p, seed);
  const int64_t B = qkv.size(0), N = qkv.size(1), H = num_heads, d = qkv.size(2) / (3 * H);
  auto out = cached_empty({B, N, H * d}, qkv.options());
  auto lse = at::empty({B, H, N}, qkv.options().dtype(at::kFloat));
  const int64_t s = seed_value(seed, dropout_p);
  CCT_DISPATCH(qkv.scalar_type(), "attention_forward_cpu", [&] {
    attention_forward_kernel<scalar_t>(qkv.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<float>(), B,
                                       N, H, d, (float)scale, dropout_p, s, lengths_data(lengths, B));
  });
  return {out, lse};
}

at::Tensor attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                  const at::Tensor& lse, int64_t num_heads, double scale, double dropout_p,
                                  const at::Tensor& seed, const c10::optional<at::Tensor>& lengths) {
  check_attention(qkv, num_heads, dropout_p, seed);
  const int64_t B = qkv.size(0), N = qkv.size(1), H = num_heads, d = qkv.size(2) / (3 * H);
  const auto g = grad_out.contiguous(), o = out.contiguous(), l = lse.to(at::kFloat).contiguous();
  auto gqkv = cached_empty(qkv.sizes(), qkv.options());
  const int64_t s = seed_value(seed, dropout_p);
  CCT_DISPATCH(qkv.scalar_type(), "attention_backward_cpu", [&] {
    attention_backward_kernel<scalar_t>(g.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                                        l.data_ptr<float>(), gqkv.data_ptr<scalar_t>(), B, N, H, d, (float)scale,
                                        dropout_p, s, lengths_data(lengths, B));
  });
  return gqkv;
}

at::Tensor attention_dropout_mask(const at::Tensor& seed, int64_t B, int64_t H, int64_t N, double dropout_p) {
  const int64_t s = seed_value(seed, dropout_p);
  auto mask = at::empty({B, H, N, N}, at::TensorOptions().dtype(at::kBool));
  bool* m = mask.data_ptr<bool>();
  const uint32_t thr = dropout_threshold(dropout_p);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const uint32_t key = dropout_key(s, bh);
      for (int64_t idx = 0; idx < N * N; ++idx) m[bh * N * N + idx] = dropout_bits(key, (uint32_t)idx) >= thr;
    }
  });
  return mask;
}

}  // namespace cct

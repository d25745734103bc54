// Helpers shared by the CPU kernels: a row-major GEMM on torch's BLAS, a branch-free exp the compiler vectorises,
// the counter-based dropout hash (the same bits in forward and backward, from the seed alone), key-padding lengths.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// torch's CPU wheels export the Fortran BLAS sgemm_ (MKL on x86-64). Declared weak so that a torch without it
// still loads this extension; gemm_rm then falls back to plain loops.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

// float32, float16, bfloat16 (the dtypes of the ops); the kernels compute in float32.
#define CCT_DISPATCH(TYPE, NAME, ...)                           \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace cct {

inline bool have_blas() { return sgemm_ != nullptr; }

// Row-major C (M x N, ldc) = alpha * op(A) (M x K) * op(B) (K x N) + beta * C. With beta == 0, C is only written
// (its old contents may be NaN). Called inside at::parallel_for: the BLAS then runs on the calling thread only.
inline void gemm_rm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
                    const float* B, int ldb, float beta, float* C, int ldc) {
  if (M <= 0 || N <= 0) return;
  if (sgemm_ != nullptr && K > 0) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands and M, N.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    sgemm_(&ta, &tb, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
    return;
  }
  for (int i = 0; i < M; ++i) {
    float* c = C + (int64_t)i * ldc;
    for (int j = 0; j < N; ++j) c[j] = beta == 0.f ? 0.f : beta * c[j];
    for (int k = 0; k < K; ++k) {
      const float a = alpha * (trans_a ? A[(int64_t)k * lda + i] : A[(int64_t)i * lda + k]);
      if (trans_b) {
        for (int j = 0; j < N; ++j) c[j] += a * B[(int64_t)j * ldb + k];
      } else {
        const float* b = B + (int64_t)k * ldb;
#pragma omp simd
        for (int j = 0; j < N; ++j) c[j] += a * b[j];
      }
    }
  }
}

// exp(x) for x in float range, relative error ~2e-7 (Cephes expf polynomial after Cody-Waite reduction).
// No branches or calls, so `#pragma omp simd` loops over it become AVX2 code (given -fno-trapping-math, see
// setup.py); std::exp does not vectorise without -ffast-math. Inputs below -87 give ~1e-38 instead of 0 (harmless for softmax weights).
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;  // ternaries and __builtin_floorf: std::min/std::floor keep GCC from vectorising
  x = x > 88.0f ? 88.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// 32-bit integer finaliser ("lowbias32", Wellons): a bijection with good avalanche; vectorises (vpmulld).
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Dropout of attention probabilities: element (bh, i, j) of the (B*H, N, N) probabilities is kept iff
// dropout_bits(key(seed, bh), i * N + j) >= dropout_threshold(p). Keys depend on the seed and bh only, so any
// thread (forward or backward) regenerates the same mask.
inline uint32_t dropout_key(int64_t seed, int64_t bh) {
  const uint32_t k0 = mix32((uint32_t)seed ^ 0x85ebca6bU) ^ mix32((uint32_t)((uint64_t)seed >> 32) + 0x27d4eb2fU);
  return mix32(k0 ^ mix32((uint32_t)bh + 0x9e3779b9U));
}
inline uint32_t dropout_bits(uint32_t key, uint32_t idx) { return mix32(key ^ mix32(idx)) >> 8; }  // 24 bits
inline uint32_t dropout_threshold(double p) { return (uint32_t)std::llround(p * 16777216.0); }
// The value of an op's (1,) int64 seed tensor (0 without dropout, where the seed may be empty or absent).
inline int64_t seed_value(const at::Tensor& seed, double dropout_p) {
  return dropout_p > 0 ? seed.to(at::kCPU).to(at::kLong).item<int64_t>() : 0;
}

// at::parallel_for grain (in tasks) so that a loop of fewer than ~32k elementary steps runs on the calling thread:
// waking the OpenMP team costs more than such loops (ATen uses the same threshold, at::internal::GRAIN_SIZE).
inline int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_task));
}

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// Key padding (text models): the data of a (B,) int64 lengths tensor, or nullptr when every token is real. The op
// layer checked the values (0 <= lengths[b] <= N).
inline const int64_t* lengths_data(const c10::optional<at::Tensor>& lengths, int64_t B) {
  if (!lengths.has_value()) return nullptr;
  TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 && lengths->size(0) == B &&
                  lengths->is_contiguous() && lengths->device().is_cpu(),
              "lengths must be a contiguous (B,) int64 CPU tensor");
  return lengths->data_ptr<int64_t>();
}

// The real tokens of sequence b: all N, or the first lengths[b].
inline int64_t real_tokens(const int64_t* lengths, int64_t b, int64_t N) { return lengths ? lengths[b] : N; }

}  // namespace cct

// Weights frozen for inference (cct_kernels.freeze): each kept, made once, in the form a CPU kernel reads, where the
// kernel would otherwise convert it on every call.
// - (N, K) float32 linear weights: MKL's packed copies for sgemm_compute, one per row count M (the format depends on
//   it), made at the first product with M rows. sgemm packs the weight on every call, and at the small row counts
//   of batch-1 inference (M = 196-256) that costs ~14% of a whole CCT forward on the 2-core VM (NOTES.md, cpu
//   extension, ninth round). Torch without MKL's packed GEMM: nothing is kept for them.
// - 4-D convolution weights: the channels-last copy oneDNN reads (the tokenizer's stages).
// An entry lives while the weight's storage does (a weak reference: the storage's memory is never confused with a
// later tensor's) and is remade when the weight's version counter moves (optimizer steps, load_state_dict, in-place
// ops). Writes through `.data` bypass the version counter and are not seen: freeze again after them.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace cct {

// Whether this torch exports MKL's packed sgemm (sgemm_pack_ / sgemm_compute_).
bool cpu_has_packed_gemm();

// Keeps weight's frozen form; returns whether there is one for it (false: a linear weight without packed sgemm, or
// a weight of another dtype or device). TORCH_CHECKs a weight that is not 2-D or 4-D, and an inference tensor (no
// version counter to tell an update).
bool freeze_weight(const at::Tensor& weight);
// Drops weight's frozen form (no error when there is none).
void unfreeze_weight(const at::Tensor& weight);
// {live frozen weights, packed copies of linear weights} (entries of dead storages are dropped first).
std::vector<int64_t> frozen_weight_stats();

// A frozen (N, K) float32 linear weight packed for sgemm_compute_ at `rows` rows (made at the first call for that
// row count), or an undefined tensor when weight is not frozen.
at::Tensor frozen_packed_gemm_weight(const at::Tensor& weight, int64_t rows);
// The channels-last copy of a frozen convolution weight, or an undefined tensor.
at::Tensor frozen_channels_last_weight(const at::Tensor& weight);

// C (M, N, row-major, ldc N) = x (M, K) W^T with W packed for M rows (beta 0: C is only written).
void packed_gemm(const at::Tensor& packed, const float* x, float* c, int M, int N, int K);

}  // namespace cct

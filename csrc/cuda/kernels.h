// Launchers of the CUDA kernels (csrc/cuda/*.cu). Raw device pointers and a stream only (no torch headers), so the
// .cu files compile with plain `nvcc -c`; csrc/ops.cpp allocates tensors and calls these.
// dtype codes: 0 float32, 1 float16, 2 bfloat16. All tensors contiguous unless strides are passed. Each launcher
// returns the cudaError_t of its launch (cudaSuccess when nothing had to run).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "../pool_geometry.h"

namespace cct {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// SeqPool, x (B, N, D), weight (D), bias (1) on device. Forward: out (B, D) float32 (the backward's out: float32),
// lse (B) float32.
// Limits: any N; D <= seqpool_cuda_max_d: 1024 when D is a multiple of 16 bytes (x read in 16-byte vectors; x and
// grad_x 16-byte aligned), else 256 (a warp keeps its rows' accumulators in registers, kSeqPoolMaxPerLane floats
// per lane). The launchers return cudaErrorInvalidValue beyond it.
constexpr int64_t kSeqPoolMaxPerLane = 32;
inline int64_t seqpool_cuda_max_d(int64_t element_size, int64_t D) {
  return D % (16 / element_size) == 0 ? 32 * kSeqPoolMaxPerLane : 32 * 8;
}
// Blocks per batch row: about 256 blocks in all (one wave on 132 SMs: registers let 2 of 512 threads reside per SM),
// at least 32 rows (2 per warp) each.
inline int64_t seqpool_cuda_splits(int64_t B, int64_t N) {
  const int64_t want = B > 0 ? (256 + B - 1) / B : 1, most = N / 32;
  return want < most ? want : (most > 1 ? most : 1);
}
// Forward workspace (float32, caller-allocated, uninitialised): the per-split partials when there are several.
inline int64_t seqpool_cuda_workspace_floats(int64_t B, int64_t N, int64_t D) {
  const int64_t S = seqpool_cuda_splits(B, N);
  return S > 1 ? B * S * (D + 2) : 0;
}
// lengths: nullptr, or (B) int64 on the device, the real tokens (a prefix) of each row, 0 <= lengths[b] <= N: the
// softmax runs over those only; a row with none gets out 0 and lse -inf.
cudaError_t seqpool_forward_cuda_launch(int dtype, const void* x, const void* weight, const void* bias,
                                        const int64_t* lengths, float* out, float* lse, float* workspace, int64_t B,
                                        int64_t N, int64_t D, cudaStream_t stream);
// Backward: grad_x (B, N, D) dtype (0 for padded tokens); partial grad_weight (B * S, D) and grad_bias (B * S) in
// float32, one row per block, S = seqpool_cuda_splits(B, N) (summed by the caller, so the result does not depend on
// atomics' order).
cudaError_t seqpool_backward_cuda_launch(int dtype, const void* grad_out, const void* x, const void* weight,
                                         const void* bias, const float* out, const float* lse, const int64_t* lengths,
                                         void* grad_x, float* grad_weight_rows, float* grad_bias_rows, int64_t B,
                                         int64_t N, int64_t D, cudaStream_t stream);

// Tokenizer epilogue: y (B, C, Ho, Wo) with element strides ys -> out, pool_index (int8) with strides os.
cudaError_t pool_forward_cuda_launch(int dtype, const void* y, Strides4 ys, void* out, int8_t* index, Strides4 os,
                                     PoolGeometry g, bool relu, cudaStream_t stream);
// Conv-output gradient gy (strides ys) gathered from grad_out, out, pool_index (strides os).
cudaError_t pool_backward_cuda_launch(int dtype, const void* grad_out, const void* out, const int8_t* index,
                                      Strides4 os, void* gy, Strides4 ys, PoolGeometry g, bool relu,
                                      cudaStream_t stream);

// Attention, head dim 64, float16/bfloat16 only: qkv (B, N, 3*H*64) -> out (B, N, H*64), lse (B, H, N) float32
// (csrc/cuda/attention_forward.cu). Pointers 16-byte aligned. lengths: nullptr, or (B) int64 on the device, the real
// tokens (a prefix) of each sequence, 0 <= lengths[b] <= N: every query attends to keys < lengths[b] only; a
// sequence with none gets out 0 and lse -inf.
cudaError_t attention_forward_cuda_launch(int dtype, const void* qkv, void* out, float* lse, const int64_t* lengths,
                                          int64_t B, int64_t N, int64_t H, float scale, cudaStream_t stream);
// Backward (csrc/cuda/attention_backward.cu): grad_qkv (B, N, 3*H*64), zero dK/dV for padded keys. Workspaces:
// delta (B, H, N) float32 and dq_accum (B, N, H*64) float32, which the caller zero-fills (16-byte aligned: dQ is
// added in 16-byte vectors). lengths as in the forward. Needs sm_80+ (sm_90 for vector atomics).
cudaError_t attention_backward_cuda_launch(int dtype, const void* grad_out, const void* qkv, const void* out,
                                           const float* lse, const int64_t* lengths, void* grad_qkv, float* delta,
                                           float* dq_accum, int64_t B, int64_t N, int64_t H, float scale,
                                           cudaStream_t stream);

}  // namespace cct

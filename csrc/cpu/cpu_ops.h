// The CPU implementations registered in csrc/ops.cpp (schemas and shapes: see there and cct_kernels/ops/*.py).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace cct {

// lengths (B,) int64 or none: row b pools its first lengths[b] tokens only (none: zeros).
std::tuple<at::Tensor, at::Tensor> seqpool_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       const at::Tensor& bias, const c10::optional<at::Tensor>& lengths);
std::tuple<at::Tensor, at::Tensor, at::Tensor> seqpool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                    const at::Tensor& weight, const at::Tensor& bias,
                                                                    const at::Tensor& out, const at::Tensor& lse,
                                                                    const c10::optional<at::Tensor>& lengths);

// lengths (B,) int64 or none: key padding (sequence b has lengths[b] real keys, a prefix).
std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& qkv, int64_t num_heads, double scale,
                                                         double dropout_p, const at::Tensor& seed,
                                                         const c10::optional<at::Tensor>& lengths);
at::Tensor attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                  const at::Tensor& lse, int64_t num_heads, double scale, double dropout_p,
                                  const at::Tensor& seed, const c10::optional<at::Tensor>& lengths);
// The keep-mask (B, H, N, N) bool the CPU attention applies for this seed and dropout_p (for tests).
at::Tensor attention_dropout_mask(const at::Tensor& seed, int64_t B, int64_t H, int64_t N, double dropout_p);

std::tuple<at::Tensor, at::Tensor> tokenize_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                        const c10::optional<at::Tensor>& bias, int64_t stride,
                                                        int64_t padding, bool relu, int64_t pool_kernel,
                                                        int64_t pool_stride, int64_t pool_padding, bool to_tokens);
std::tuple<at::Tensor, at::Tensor, at::Tensor> tokenize_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& out, const at::Tensor& pool_index, int64_t stride, int64_t padding, bool relu,
    int64_t pool_kernel, int64_t pool_stride, int64_t pool_padding, bool to_tokens, bool needs_input_grad);

// x (B, L, C), weight (E, k, C); pool_kernel 0: no pool (pool_index empty). See cct_kernels/ops/text_tokenize.py.
std::tuple<at::Tensor, at::Tensor> text_tokenize_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                             int64_t stride, int64_t padding, bool relu,
                                                             int64_t pool_kernel, int64_t pool_stride,
                                                             int64_t pool_padding);
std::tuple<at::Tensor, at::Tensor> text_tokenize_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& weight, const at::Tensor& out,
                                                              const at::Tensor& pool_index, int64_t stride,
                                                              int64_t padding, bool relu, int64_t pool_kernel,
                                                              int64_t pool_stride, int64_t pool_padding,
                                                              bool needs_input_grad);

// x (M, K), weight (N, K), bias (N,), residual (M, N), row_scale (M,) (each optional), dropout_p in [0, 1] with a
// (1,) int64 seed when > 0, a LayerNorm over each output row when norm_weight (N,) is given (norm_bias (N,)
// optional, no GELU) -> (out (M, N); saved (M, N): with save_for_backward, GELU's input h or the sum the LayerNorm
// normalised, else empty; stats (2, M) float32: the LayerNorm's mean and 1 / std per row, else empty).
// See cct_kernels/ops/linear.py.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& residual, bool gelu, bool save_for_backward,
    const c10::optional<at::Tensor>& row_scale, double dropout_p = 0.0,
    const c10::optional<at::Tensor>& seed = c10::nullopt, const c10::optional<at::Tensor>& norm_weight = c10::nullopt,
    const c10::optional<at::Tensor>& norm_bias = c10::nullopt, double norm_eps = 1e-5);
// x (M, K) normalised with a LayerNorm's row statistics stats (2, M) float32 (mean, 1 / std), weight and bias (K,).
at::Tensor normalise_rows_cpu(const at::Tensor& x, const at::Tensor& stats, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias);
// The backward's gradient at h = x W^T + b in one pass: grad_out * row_scale, dropout's mask and scale, GELU'(h)
// when pre_activation (h) is given; (M, N) in grad_out's dtype.
at::Tensor linear_grad_pre_activation_cpu(const at::Tensor& grad_out, const c10::optional<at::Tensor>& pre_activation,
                                          const c10::optional<at::Tensor>& row_scale, double dropout_p,
                                          const c10::optional<at::Tensor>& seed);

// The CCT encoder block in inference: pre_norm, qkv, attention, proj + residual, norm1, linear1 + GELU,
// linear2 + residual (csrc/cpu/encoder_layer.cpp); src (B, N, D) -> (B, N, D).
at::Tensor encoder_layer_forward_cpu(const at::Tensor& src, const at::Tensor& pre_norm_weight,
                                     const at::Tensor& pre_norm_bias, const at::Tensor& qkv_weight,
                                     const at::Tensor& proj_weight, const at::Tensor& proj_bias,
                                     const at::Tensor& norm1_weight, const at::Tensor& norm1_bias,
                                     const at::Tensor& linear1_weight, const at::Tensor& linear1_bias,
                                     const at::Tensor& linear2_weight, const at::Tensor& linear2_bias,
                                     int64_t num_heads, double scale, double pre_norm_eps, double norm1_eps);
// Blocks in sequence (csrc/cpu/encoder_layer.cpp): parameters holds each layer's 11 tensors in
// encoder_layer_forward's order, the lists one entry per layer.
at::Tensor encoder_layers_forward_cpu(const at::Tensor& src, at::TensorList parameters, at::IntArrayRef num_heads,
                                      at::ArrayRef<double> scale, at::ArrayRef<double> pre_norm_eps,
                                      at::ArrayRef<double> norm1_eps);

// Whether the CPU GEMMs use torch's BLAS (sgemm_) rather than the plain-loop fallback.
bool cpu_has_blas();

}  // namespace cct

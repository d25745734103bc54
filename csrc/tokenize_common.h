// Device-agnostic parts of the tokenize op (used by the CPU kernels and by the CUDA launchers in ops.cpp): input
// checks, shapes, the output allocation for either layout, the no-pool epilogue, and the convolution backward.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "pool_geometry.h"

namespace cct {

inline void check_tokenize(const at::Tensor& x, const at::Tensor& weight, int64_t pool_kernel) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "tokenize: x (B, C_in, H, W) and weight (C_out, C_in, kh, kw)");
  TORCH_CHECK(pool_kernel >= 0 && pool_kernel <= 11, "tokenize: pool_kernel must be in [0, 11] (int8 pool_index)");
}

inline std::vector<int64_t> conv_output_shape(const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                                              int64_t padding) {
  return {x.size(0), weight.size(0), (x.size(2) + 2 * padding - weight.size(2)) / stride + 1,
          (x.size(3) + 2 * padding - weight.size(3)) / stride + 1};
}

// `conv_shape`: the conv output's (B, C, Ho, Wo).
inline PoolGeometry pool_geometry(at::IntArrayRef conv_shape, int64_t pk, int64_t ps, int64_t pp) {
  const int64_t Ho = conv_shape[2], Wo = conv_shape[3];
  return PoolGeometry{conv_shape[0], conv_shape[1], Ho, Wo, (Ho + 2 * pp - pk) / ps + 1, (Wo + 2 * pp - pk) / ps + 1,
                      pk, ps, pp};
}

// out (B, Hp*Wp, C) tokens or (B, C, Hp, Wp), pool_index int8 of out's shape, and their [b, c, h, w] strides.
// A (B, C, Hp, Wp) output is channels-last when `channels_last` (its strides are then the tokens').
inline std::tuple<at::Tensor, at::Tensor, Strides4> allocate_pooled(const at::TensorOptions& options,
                                                                    const PoolGeometry& g, bool to_tokens,
                                                                    bool channels_last) {
  const std::vector<int64_t> shape =
      to_tokens ? std::vector<int64_t>{g.B, g.Hp * g.Wp, g.C} : std::vector<int64_t>{g.B, g.C, g.Hp, g.Wp};
  const auto fmt = !to_tokens && channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return {at::empty(shape, options.memory_format(fmt)), at::empty(shape, options.dtype(at::kChar).memory_format(fmt)),
          pooled_strides(g, to_tokens || channels_last)};
}

// No pooling: out = ReLU(y) (or y) in the requested layout, pool_index empty.
inline std::tuple<at::Tensor, at::Tensor> conv_epilogue_no_pool(at::Tensor y, bool relu, bool to_tokens,
                                                                bool channels_last) {
  const int64_t B = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  at::Tensor out = to_tokens       ? y.permute({0, 2, 3, 1}).reshape({B, HW, C})
                   : channels_last ? y.contiguous(at::MemoryFormat::ChannelsLast)
                                   : y.contiguous();
  if (relu) out = at::relu(out);  // a fresh tensor: y may be shared with the reshape view
  return {out, at::empty({0}, y.options().dtype(at::kChar))};
}

// Gradient of the conv output (B, C, Ho, Wo) without pooling: grad_out in its layout, masked where ReLU clipped.
inline at::Tensor grad_no_pool(const at::Tensor& grad_out, const at::Tensor& out, at::IntArrayRef conv_shape,
                               bool relu, bool to_tokens) {
  at::Tensor g = relu ? at::threshold_backward(grad_out, out, 0) : grad_out;
  if (to_tokens) g = g.view({conv_shape[0], conv_shape[2], conv_shape[3], conv_shape[1]}).permute({0, 3, 1, 2});
  return g;
}

// (grad_x or an empty tensor when !needs_input_grad, grad_weight, grad_bias or an empty tensor) from the
// conv-output gradient; grad_x in `grad_x_format`, grad_weight row-major. The image stem needs no grad_x: skipping
// it saves a conv.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward(const at::Tensor& gy, const at::Tensor& xin,
                                                                    const at::Tensor& win,
                                                                    const c10::optional<at::Tensor>& bias,
                                                                    int64_t stride, int64_t padding,
                                                                    const at::Tensor& x, bool needs_input_grad,
                                                                    at::MemoryFormat grad_x_format) {
  const bool has_bias = bias.has_value() && bias->defined();
  std::vector<int64_t> bias_sizes;
  if (has_bias) bias_sizes = {bias->size(0)};
  auto grads = at::convolution_backward(gy, xin, win, has_bias ? at::OptionalIntArrayRef(bias_sizes) : c10::nullopt,
                                        {stride, stride}, {padding, padding}, {1, 1}, false, {0, 0}, 1,
                                        {needs_input_grad, true, has_bias});
  // Distinct empty tensors: outputs of a registered op must not alias each other.
  return {needs_input_grad ? std::get<0>(grads).contiguous(grad_x_format) : at::empty({0}, x.options()),
          std::get<1>(grads).contiguous(), has_bias ? std::get<2>(grads) : at::empty({0}, x.options())};
}

}  // namespace cct

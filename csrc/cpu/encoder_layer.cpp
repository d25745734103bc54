// The whole CCT encoder block in inference, one call from Python: the official order (pre_norm, qkv, attention,
// proj + residual, norm1 overwriting the residual stream, linear1 + GELU, linear2 + residual) on this backend's
// linear and attention kernels. Why: at batch 1 the block's eight op calls through Python cost ~15-20 us each
// (NOTES.md, cpu extension, fifth round); the kernels and their order are those of the op-by-op path (norm1 in
// proj's epilogue, as ops.linear's LayerNorm epilogue), so the output is the same to the bit. No dropout,
// stochastic depth or key padding (eval mode, no mask: the op layer runs every other case op by op). The
// intermediates of the linears and attention live in the output cache (output_cache.h); pre_norm's stays on ATen's
// allocator.
// encoder_layers_forward runs a stack of such blocks in one call: between two blocks' C++ calls, the Python of the
// modules and the op's checks (~20 us) cost ~0.1 ms a block at batch 1 on the 2-core VM (NOTES.md, cpu extension,
// eighth round).
#include "cpu_ops.h"

namespace cct {

namespace {
// pre_norm weight and bias, qkv weight, proj weight and bias, norm1 weight and bias, linear1 weight and bias,
// linear2 weight and bias: encoder_layer_forward's tensor arguments, in its order
constexpr size_t kLayerParameters = 11;
}  // namespace

at::Tensor encoder_layer_forward_cpu(const at::Tensor& src, const at::Tensor& pre_norm_weight,
                                     const at::Tensor& pre_norm_bias, const at::Tensor& qkv_weight,
                                     const at::Tensor& proj_weight, const at::Tensor& proj_bias,
                                     const at::Tensor& norm1_weight, const at::Tensor& norm1_bias,
                                     const at::Tensor& linear1_weight, const at::Tensor& linear1_bias,
                                     const at::Tensor& linear2_weight, const at::Tensor& linear2_bias,
                                     int64_t num_heads, double scale, double pre_norm_eps, double norm1_eps) {
  TORCH_CHECK(src.dim() == 3, "encoder_layer: src must be (B, N, D), got ", src.dim(), " dims");
  const int64_t B = src.size(0), N = src.size(1), D = src.size(2);
  const auto x = src.reshape({B * N, D}).contiguous();
  const auto none = c10::optional<at::Tensor>();
  const auto normed = at::layer_norm(x, {D}, pre_norm_weight, pre_norm_bias, pre_norm_eps);
  const auto qkv = std::get<0>(linear_forward_cpu(normed, qkv_weight, none, none, false, false, none));
  const auto heads = std::get<0>(attention_forward_cpu(qkv.view({B, N, qkv.size(1)}), num_heads, scale, 0.0,
                                                       at::Tensor(), none));
  const auto stream = std::get<0>(linear_forward_cpu(heads.view({B * N, -1}), proj_weight, proj_bias, x, false, false,
                                                     none, 0.0, none, norm1_weight, norm1_bias, norm1_eps));
  const auto hidden = std::get<0>(linear_forward_cpu(stream, linear1_weight, linear1_bias, none, true, false, none));
  return std::get<0>(linear_forward_cpu(hidden, linear2_weight, linear2_bias, stream, false, false, none))
      .view({B, N, D});
}

at::Tensor encoder_layers_forward_cpu(const at::Tensor& src, at::TensorList parameters, at::IntArrayRef num_heads,
                                      at::ArrayRef<double> scale, at::ArrayRef<double> pre_norm_eps,
                                      at::ArrayRef<double> norm1_eps) {
  const size_t layers = num_heads.size();
  TORCH_CHECK(layers > 0, "encoder_layers: at least one layer (the output must not be src itself)");
  TORCH_CHECK(scale.size() == layers && pre_norm_eps.size() == layers && norm1_eps.size() == layers,
              "encoder_layers: num_heads, scale, pre_norm_eps and norm1_eps must have one entry per layer");
  TORCH_CHECK(parameters.size() == kLayerParameters * layers, "encoder_layers: expected ",
              kLayerParameters * layers, " parameters (", kLayerParameters, " per layer), got ", parameters.size());
  at::Tensor out = src;
  for (size_t i = 0; i < layers; ++i) {
    const at::Tensor* p = parameters.data() + kLayerParameters * i;
    out = encoder_layer_forward_cpu(out, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10],
                                    num_heads[i], scale[i], pre_norm_eps[i], norm1_eps[i]);
  }
  return out;
}

}  // namespace cct

// Registration of the extension's ops in the torch.ops.cct_kernels_C namespace: schemas, CPU kernels (csrc/cpu) and,
// when built with CUDA (CCT_WITH_CUDA), thin launchers over the raw-pointer CUDA kernels of csrc/cuda.
// Each op has the signature of the matching kernel-module function in cct_kernels/ops/*.py; the Python adapters in
// cct_kernels/extension/ call these ops and add capability checks (unsupported()).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/common.h"
#include "cpu/cpu_ops.h"
#include "cpu/frozen_weights.h"
#include "cpu/output_cache.h"

#ifdef CCT_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/kernels.h"
#include "tokenize_common.h"
#endif

#ifndef CCT_CPU_ARCH
#define CCT_CPU_ARCH "default"
#endif

namespace cct {

bool cpu_has_blas() { return have_blas(); }

bool built_with_cuda() {
#ifdef CCT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// A one-line description of the build, for `cct_kernels.extension.info()`.
std::string build_info() {
  std::string s = std::string("cpu: -march=") + CCT_CPU_ARCH + ", OpenMP threads " +
                  std::to_string(at::get_num_threads()) + ", gemm " + (have_blas() ? "BLAS sgemm_" : "plain loops") +
                  (cpu_has_packed_gemm() ? " (packed weights: sgemm_pack_)" : "");
#ifdef CCT_WITH_CUDA
  s += std::string("; cuda: TORCH_CUDA_ARCH_LIST=") + CCT_CUDA_ARCHS;
#else
  s += "; cuda: not built";
#endif
  return s;
}


#ifdef CCT_WITH_CUDA
// ---- CUDA: thin launchers. Tensors are allocated here, kernels get raw pointers (csrc/cuda/kernels.h). ----
namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "cct_kernels_C: unsupported dtype ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "cct_kernels_C: ", what, " failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The attention and seqpool kernels load 16-byte vectors: t contiguous, copied when its data pointer is not
// 16-byte aligned (a view at an odd offset).
at::Tensor aligned16(const at::Tensor& t) {
  auto c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

void check_seqpool_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3, "seqpool (cuda): x must be (B, N, D), got ", x.dim(), " dims");
  const int64_t max_d = seqpool_cuda_max_d(x.element_size(), x.size(2));
  TORCH_CHECK(x.size(2) <= max_d, "seqpool (cuda): D = ", x.size(2), " exceeds ", max_d, " for ", x.scalar_type(),
              " (1024 when D * element size is a multiple of 16 bytes, else 256)");
}

Strides4 strides4(const at::Tensor& t) { return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Key-padding lengths for the kernels: nullptr for none, else a contiguous (B,) int64 tensor on x's device (the op
// layer has checked 0 <= lengths <= N; the kernels clamp, so a bad value cannot read out of bounds).
const int64_t* lengths_cuda(const c10::optional<at::Tensor>& lengths, const at::Tensor& x, const char* op) {
  if (!lengths.has_value()) return nullptr;
  TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 && lengths->size(0) == x.size(0) &&
                  lengths->is_contiguous() && lengths->device() == x.device(),
              op, " (cuda): lengths must be a contiguous (B,) int64 tensor on ", x.device());
  return lengths->data_ptr<int64_t>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> seqpool_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                        const at::Tensor& bias,
                                                        const c10::optional<at::Tensor>& lengths) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_seqpool_cuda(x);
  const int64_t* lens = lengths_cuda(lengths, x, "seqpool");
  const auto xc = aligned16(x), w = weight.contiguous(), b = bias.contiguous();
  auto out = at::empty({x.size(0), x.size(2)}, x.options().dtype(at::kFloat));  // float32: see seqpool.cu
  auto lse = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  auto workspace = at::empty({seqpool_cuda_workspace_floats(x.size(0), x.size(1), x.size(2))},
                             x.options().dtype(at::kFloat));
  check_launch(seqpool_forward_cuda_launch(dtype_code(x), xc.data_ptr(), w.data_ptr(), b.data_ptr(), lens,
                                           out.data_ptr<float>(), lse.data_ptr<float>(), workspace.data_ptr<float>(),
                                           x.size(0), x.size(1), x.size(2), stream()),
               "seqpool forward");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> seqpool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                                     const at::Tensor& weight, const at::Tensor& bias,
                                                                     const at::Tensor& out, const at::Tensor& lse,
                                                                     const c10::optional<at::Tensor>& lengths) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  check_seqpool_cuda(x);
  const int64_t* lens = lengths_cuda(lengths, x, "seqpool");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "seqpool backward (cuda): out must be the forward's float32 output");
  const auto g = grad_out.contiguous(), xc = aligned16(x), w = weight.contiguous(), b = bias.contiguous(),
             o = out.contiguous(), l = lse.to(at::kFloat).contiguous();
  auto gx = at::empty_like(xc);
  const int64_t splits = seqpool_cuda_splits(B, N), parts = B * splits;  // one partial row per block
  auto gw_rows = at::empty({parts, D}, x.options().dtype(at::kFloat));
  auto gb_rows = at::empty({parts}, x.options().dtype(at::kFloat));
  check_launch(seqpool_backward_cuda_launch(dtype_code(x), g.data_ptr(), xc.data_ptr(), w.data_ptr(), b.data_ptr(),
                                            o.data_ptr<float>(), l.data_ptr<float>(), lens, gx.data_ptr(),
                                            gw_rows.data_ptr<float>(), gb_rows.data_ptr<float>(), B, N, D, stream()),
               "seqpool backward");
  // Each row's ds sums to delta = g.(out_exact - out), 0 up to float32 rounding; the exactly centred ds give
  // dw - delta out and db = 0 (softmax is shift-invariant), written delta - delta so that a NaN row still gives
  // NaN, as the reference does.
  const auto delta = gb_rows.view({B, splits}).sum(1, true);
  const auto gw = (gw_rows.sum(0) - (delta * o).sum(0)).view({1, D});
  return {gx, gw.to(weight.scalar_type()), (delta - delta).sum(0).to(bias.scalar_type())};
}

// The convolution runs channels-last on cuDNN so that the epilogue reads and writes along channels (coalesced).
std::tuple<at::Tensor, at::Tensor> tokenize_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                         const c10::optional<at::Tensor>& bias, int64_t stride,
                                                         int64_t padding, bool relu, int64_t pool_kernel,
                                                         int64_t pool_stride, int64_t pool_padding, bool to_tokens) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_tokenize(x, weight, pool_kernel);
  const auto cl = at::MemoryFormat::ChannelsLast;
  auto y = at::convolution(x.contiguous(cl), weight.contiguous(cl), bias, {stride, stride}, {padding, padding},
                           {1, 1}, false, {0, 0}, 1);
  if (pool_kernel == 0) return conv_epilogue_no_pool(y.contiguous(cl), relu, to_tokens, false);
  const PoolGeometry g = pool_geometry(y.sizes(), pool_kernel, pool_stride, pool_padding);
  auto [out, index, os] = allocate_pooled(y.options(), g, to_tokens, false);
  check_launch(pool_forward_cuda_launch(dtype_code(y), y.data_ptr(), strides4(y), out.data_ptr(),
                                        index.data_ptr<int8_t>(), os, g, relu, stream()),
               "tokenize forward epilogue");
  return {out, index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tokenize_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& out, const at::Tensor& pool_index, int64_t stride, int64_t padding, bool relu,
    int64_t pool_kernel, int64_t pool_stride, int64_t pool_padding, bool to_tokens, bool needs_input_grad) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_tokenize(x, weight, pool_kernel);
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto xin = x.contiguous(cl), win = weight.contiguous(cl);
  const auto conv_shape = conv_output_shape(x, weight, stride, padding);
  const auto go = grad_out.contiguous(), o = out.contiguous();
  at::Tensor gy;
  if (pool_kernel == 0) {
    gy = grad_no_pool(go, o, conv_shape, relu, to_tokens).contiguous(cl);
  } else {
    gy = at::empty(conv_shape, x.options().memory_format(cl));
    const PoolGeometry g = pool_geometry(gy.sizes(), pool_kernel, pool_stride, pool_padding);
    const auto idx = pool_index.contiguous();
    check_launch(pool_backward_cuda_launch(dtype_code(x), go.data_ptr(), o.data_ptr(), idx.data_ptr<int8_t>(),
                                           pooled_strides(g, to_tokens), gy.data_ptr(), strides4(gy), g, relu,
                                           stream()),
                 "tokenize backward gather");
  }
  return conv_backward(gy, xin, win, bias, stride, padding, x, needs_input_grad, at::MemoryFormat::Contiguous);
}

namespace {
void check_attention_cuda(const at::Tensor& qkv, int64_t num_heads, double dropout_p) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) == 3 * num_heads * 64, "attention (cuda): head dim 64 only");
  TORCH_CHECK(qkv.scalar_type() == at::kHalf || qkv.scalar_type() == at::kBFloat16,
              "attention (cuda): float16 or bfloat16 only");
  TORCH_CHECK(dropout_p == 0, "attention (cuda): dropout is not supported");
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& qkv, int64_t num_heads, double scale,
                                                          double dropout_p, const at::Tensor& seed,
                                                          const c10::optional<at::Tensor>& lengths) {
  const c10::cuda::CUDAGuard guard(qkv.device());
  check_attention_cuda(qkv, num_heads, dropout_p);
  const int64_t* lens = lengths_cuda(lengths, qkv, "attention");
  const auto q = aligned16(qkv);
  const int64_t B = q.size(0), N = q.size(1), H = num_heads;
  auto out = at::empty({B, N, H * 64}, q.options());
  auto lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  check_launch(attention_forward_cuda_launch(dtype_code(q), q.data_ptr(), out.data_ptr(), lse.data_ptr<float>(), lens,
                                             B, N, H, (float)scale, stream()),
               "attention forward");
  return {out, lse};
}

at::Tensor attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                   const at::Tensor& lse, int64_t num_heads, double scale, double dropout_p,
                                   const at::Tensor& seed, const c10::optional<at::Tensor>& lengths) {
  const c10::cuda::CUDAGuard guard(qkv.device());
  check_attention_cuda(qkv, num_heads, dropout_p);
  const int64_t* lens = lengths_cuda(lengths, qkv, "attention");
  const auto q = aligned16(qkv), g = aligned16(grad_out), o = aligned16(out), l = lse.to(at::kFloat).contiguous();
  const int64_t B = q.size(0), N = q.size(1), H = num_heads;
  auto gqkv = at::empty_like(q);
  auto delta = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  auto dq_accum = at::zeros({B, N, H * 64}, q.options().dtype(at::kFloat));
  check_launch(attention_backward_cuda_launch(dtype_code(q), g.data_ptr(), q.data_ptr(), o.data_ptr(),
                                              l.data_ptr<float>(), lens, gqkv.data_ptr(), delta.data_ptr<float>(),
                                              dq_accum.data_ptr<float>(), B, N, H, (float)scale, stream()),
               "attention backward");
  return gqkv;
}
#endif  // CCT_WITH_CUDA

}  // namespace cct

TORCH_LIBRARY(cct_kernels_C, m) {
  m.def("built_with_cuda() -> bool", &cct::built_with_cuda);
  m.def("build_info() -> str", &cct::build_info);
  m.def("output_cache_stats() -> int[]", &cct::output_cache_stats);
  m.def("output_cache_release() -> ()", &cct::output_cache_release);
  m.def("cpu_has_packed_gemm() -> bool", &cct::cpu_has_packed_gemm);
  m.def("freeze_weight(Tensor weight) -> bool", &cct::freeze_weight);
  m.def("unfreeze_weight(Tensor weight) -> ()", &cct::unfreeze_weight);
  m.def("frozen_weight_stats() -> int[]", &cct::frozen_weight_stats);
  // lengths: key padding of text models, (B,) int64 real-token counts (a prefix of each sequence), or None.
  m.def("seqpool_forward(Tensor x, Tensor weight, Tensor bias, Tensor? lengths=None) -> (Tensor, Tensor)");
  m.def("seqpool_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, Tensor out, Tensor lse,"
        " Tensor? lengths=None) -> (Tensor, Tensor, Tensor)");
  m.def("attention_forward(Tensor qkv, int num_heads, float scale, float dropout_p, Tensor seed,"
        " Tensor? lengths=None) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, float scale,"
        " float dropout_p, Tensor seed, Tensor? lengths=None) -> Tensor");
  m.def("attention_dropout_mask(Tensor seed, int B, int H, int N, float dropout_p) -> Tensor",
        &cct::attention_dropout_mask);
  m.def("tokenize_forward(Tensor x, Tensor weight, Tensor? bias, int stride, int padding, bool relu, int pool_kernel,"
        " int pool_stride, int pool_padding, bool to_tokens) -> (Tensor, Tensor)");
  m.def("tokenize_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor out, Tensor pool_index,"
        " int stride, int padding, bool relu, int pool_kernel, int pool_stride, int pool_padding, bool to_tokens,"
        " bool needs_input_grad) -> (Tensor, Tensor, Tensor)");
  // Linear + epilogue: dropout(act(x W^T + b)) * row_scale + residual (act GELU when gelu), then a LayerNorm when
  // norm_weight is given; the backward's gradient at h in one pass.
  m.def("linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, bool gelu,"
        " bool save_for_backward, Tensor? row_scale=None, float dropout_p=0., Tensor? seed=None,"
        " Tensor? norm_weight=None, Tensor? norm_bias=None, float norm_eps=1e-5) -> (Tensor, Tensor, Tensor)");
  m.def("linear_grad_pre_activation(Tensor grad_out, Tensor? pre_activation, Tensor? row_scale, float dropout_p,"
        " Tensor? seed) -> Tensor");
  m.def("normalise_rows(Tensor x, Tensor stats, Tensor weight, Tensor? bias) -> Tensor");
  // The encoder block in inference (eval mode, no mask) on the kernels above, in the official order.
  m.def("encoder_layer_forward(Tensor src, Tensor pre_norm_weight, Tensor pre_norm_bias, Tensor qkv_weight,"
        " Tensor proj_weight, Tensor proj_bias, Tensor norm1_weight, Tensor norm1_bias, Tensor linear1_weight,"
        " Tensor linear1_bias, Tensor linear2_weight, Tensor linear2_bias, int num_heads, float scale,"
        " float pre_norm_eps, float norm1_eps) -> Tensor");
  // Encoder blocks in sequence, each layer's 11 tensors in encoder_layer_forward's order.
  m.def("encoder_layers_forward(Tensor src, Tensor[] parameters, int[] num_heads, float[] scale,"
        " float[] pre_norm_eps, float[] norm1_eps) -> Tensor");
  m.def("text_tokenize_forward(Tensor x, Tensor weight, int stride, int padding, bool relu, int pool_kernel,"
        " int pool_stride, int pool_padding) -> (Tensor, Tensor)");
  m.def("text_tokenize_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor out, Tensor pool_index, int stride,"
        " int padding, bool relu, int pool_kernel, int pool_stride, int pool_padding, bool needs_input_grad)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cct_kernels_C, CPU, m) {
  m.impl("seqpool_forward", &cct::seqpool_forward_cpu);
  m.impl("seqpool_backward", &cct::seqpool_backward_cpu);
  m.impl("attention_forward", &cct::attention_forward_cpu);
  m.impl("attention_backward", &cct::attention_backward_cpu);
  m.impl("tokenize_forward", &cct::tokenize_forward_cpu);
  m.impl("tokenize_backward", &cct::tokenize_backward_cpu);
  m.impl("linear_forward", &cct::linear_forward_cpu);
  m.impl("linear_grad_pre_activation", &cct::linear_grad_pre_activation_cpu);
  m.impl("normalise_rows", &cct::normalise_rows_cpu);
  m.impl("encoder_layer_forward", &cct::encoder_layer_forward_cpu);
  m.impl("encoder_layers_forward", &cct::encoder_layers_forward_cpu);
  m.impl("text_tokenize_forward", &cct::text_tokenize_forward_cpu);
  m.impl("text_tokenize_backward", &cct::text_tokenize_backward_cpu);
}

#ifdef CCT_WITH_CUDA
TORCH_LIBRARY_IMPL(cct_kernels_C, CUDA, m) {
  m.impl("seqpool_forward", &cct::seqpool_forward_cuda);
  m.impl("seqpool_backward", &cct::seqpool_backward_cuda);
  m.impl("attention_forward", &cct::attention_forward_cuda);
  m.impl("attention_backward", &cct::attention_backward_cuda);
  m.impl("tokenize_forward", &cct::tokenize_forward_cuda);
  m.impl("tokenize_backward", &cct::tokenize_backward_cuda);
}
#endif

// `import cct_kernels._C` loads this library (and so runs the registrations above); it has no Python functions.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "cct_kernels C++/CUDA ops (torch.ops.cct_kernels_C)",
                                      -1, nullptr};
  return PyModule_Create(&module);
}

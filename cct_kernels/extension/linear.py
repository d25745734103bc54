"""Linear + epilogue kernels of the "cpu" and "cuda" backends. Interface: cct_kernels/ops/linear.py.

"cpu" (csrc/cpu/linear.cpp): one MKL sgemm over all rows, then a single parallel pass for the whole epilogue (bias,
    exact GELU, dropout, stochastic depth's row scale, residual, the cast, the LayerNorm) where ATen would run addmm
    (a bias copy and the GEMM) and a pass per elementwise op. float32/float16/bfloat16 (16-bit operands widened to
    float32), any M >= 0. Dropout's mask is hashed in the pass (reference.linear_dropout_mask), never stored. A frozen
    float32 weight (cct_kernels.freeze) is read from its copy packed for M rows when M <= 4096 (extension/frozen.py).
"cuda": cuBLAS (F.linear) with the epilogue as ATen passes (aten_forward, aten_grad_pre_activation): cuBLASLt's
    fused GELU epilogue is the tanh approximation, not the exact GELU of the official model. Dropout's mask is
    reference.linear_dropout_mask, drawn in each pass that needs it. The fused GPU kernel is the triton backend's.
Training (save_for_backward) also writes h = x @ W.T + b, the GELU's input, or the sum the LayerNorm normalises.
The input LayerNorm (input_norm_*, both devices) is ATen's native_layer_norm before the GEMM; the backward recomputes
its output for grad_W from x rather than keeping it.
Backward, both devices: grad_h = GELU'(h) * mask / (1 - p) * row_scale * grad_out (cpu: one C++ pass; cuda: ATen's
gelu_backward and products), grad_x = grad_h @ W, grad_W = grad_h.T @ x (vendor GEMMs), grad_b = the column sums of
grad_h (float32 accumulation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cct_kernels import extension, reference


def unsupported(x, weight, bias, residual, activation, norm_weight=None, input_norm_weight=None, *,
                backend: str) -> str | None:
    return extension.dtype_reason(x.dtype)


def forward(x, weight, bias, residual, activation, save_for_backward, row_scale=None, dropout_p=0.0, seed=None,
            norm_weight=None, norm_bias=None, norm_eps=1e-5, input_norm_weight=None, input_norm_bias=None,
            input_norm_eps=1e-5):
    """-> (out (M, N); saved (M, N) with save_for_backward: GELU's input or the LayerNorm's, else empty (0,);
    stats, input_stats (2, M) float32 with the output / input LayerNorm: mean and 1 / std per row, else empty)."""
    input_stats = x.new_empty(0, dtype=torch.float32)
    if input_norm_weight is not None:
        x, input_stats = _layer_norm_rows(x, input_norm_weight, input_norm_bias, input_norm_eps)
    args = (x, weight, bias, residual, activation == "gelu", save_for_backward, row_scale, dropout_p, seed,
            norm_weight, norm_bias, norm_eps)
    if x.device.type == "cpu":
        return (*extension.ops().linear_forward(*args), input_stats)
    return (*aten_forward(*args), input_stats)


def backward(grad_out, x, weight, has_bias, pre_activation, activation, row_scale=None, dropout_p=0.0, seed=None,
             input_norm_weight=None, input_norm_bias=None, input_stats=None):
    """-> (grad at the GEMM's input (M, K), grad_weight (N, K), grad_bias (N,) or empty (0,) without bias)."""
    gelu = activation == "gelu"
    if x.device.type != "cpu":
        grad_h = aten_grad_pre_activation(grad_out, pre_activation if gelu else None, row_scale, dropout_p, seed)
    elif gelu or row_scale is not None or dropout_p > 0:
        grad_h = extension.ops().linear_grad_pre_activation(grad_out, pre_activation if gelu else None, row_scale,
                                                            dropout_p, seed)
    else:
        grad_h = grad_out
    if input_norm_weight is not None:  # the GEMM's input, recomputed from x and the forward's statistics
        x = _normalise_rows(x, input_stats, input_norm_weight, input_norm_bias)
    return reference.linear_grads(grad_h, x, weight, has_bias)


def _layer_norm_rows(x, weight, bias, eps):
    """(LayerNorm of x's rows in x's dtype, (2, M) float32 mean and 1 / std). ATen's CPU kernel keeps 16-bit
    statistics in 16 bits, too coarse for the backward: those rows are normalised in float32."""
    widen = x.device.type == "cpu" and x.dtype != torch.float32
    args = (x, weight, bias) if not widen else (x.float(), weight.float(), None if bias is None else bias.float())
    normed, mean, rstd = torch.native_layer_norm(args[0], [x.shape[1]], args[1], args[2], eps)
    return normed.to(x.dtype), torch.stack([mean.view(-1), rstd.view(-1)]).float()


def _normalise_rows(x, stats, weight, bias):
    """(x - mean) * rstd * weight + bias from stats (2, M) float32: one C++ pass on CPU, ATen ops on CUDA."""
    if x.device.type == "cpu":
        return extension.ops().normalise_rows(x, stats, weight, bias)
    normed = (x.float() - stats[0, :, None]) * stats[1, :, None] * weight.float()
    return (normed if bias is None else normed + bias.float()).to(x.dtype)


def _dropout_scale(x, dropout_p, seed):
    """Dropout's factor per element of x (M, N): mask / (1 - p) in x's dtype."""
    keep = reference.linear_dropout_mask(seed, x.shape[0], x.shape[1], dropout_p)
    return keep.to(x.dtype) * (1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0)


def aten_forward(x, weight, bias, residual, gelu, save_for_backward, row_scale, dropout_p, seed, norm_weight,
                 norm_bias, norm_eps):
    """The cuda forward in ATen ops (any device: tests run it on CPU tensors); arguments as the C++ op's."""
    pre_activation = F.linear(x, weight, bias)
    out = F.gelu(pre_activation) if gelu else pre_activation
    if dropout_p > 0:
        out = out * _dropout_scale(out, dropout_p, seed)
    if row_scale is not None:
        out = out * row_scale[:, None]
    if residual is not None:
        out = out + residual
    empty = x.new_empty(0)
    if norm_weight is None:
        return out, (pre_activation if gelu and save_for_backward else empty), empty.float()
    normed, stats = _layer_norm_rows(out, norm_weight, norm_bias, norm_eps)
    return normed, (out if save_for_backward else empty), stats


def aten_grad_pre_activation(grad_out, pre_activation, row_scale, dropout_p, seed):
    """The cuda backward's grad_h in ATen ops (any device); pre_activation None without GELU."""
    grad_h = grad_out if row_scale is None else grad_out * row_scale[:, None]
    if dropout_p > 0:
        grad_h = grad_h * _dropout_scale(grad_h, dropout_p, seed)
    return grad_h if pre_activation is None else torch.ops.aten.gelu_backward(grad_h, pre_activation)

"""Linear + epilogue kernels of the "cpu" and "cuda" backends. Interface: cct_kernels/ops/linear.py.

"cpu" (csrc/cpu/linear.cpp): one MKL sgemm over all rows, then a single parallel pass for the whole epilogue (bias,
    exact GELU, stochastic depth's row scale, residual, the cast) where ATen would run addmm (a bias copy and the
    GEMM) and a pass per elementwise op. float32/float16/bfloat16 (16-bit operands widened to float32), any M >= 0.
"cuda": cuBLAS (F.linear) with the epilogue as ATen passes: cuBLASLt's fused GELU epilogue is the tanh
    approximation, not the exact GELU of the official model. The fused GPU kernel is the triton backend's.
Training (save_pre_activation) also writes h = x @ W.T + b, the GELU's input, for the backward.
Backward, both devices: grad_h = GELU'(h) * grad_out (ATen's one-pass gelu_backward), grad_x = grad_h @ W,
grad_W = grad_h.T @ x (vendor GEMMs), grad_b = the column sums of grad_h (float32 accumulation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cct_kernels import extension


def unsupported(x, weight, bias, residual, activation, *, backend: str) -> str | None:
    return extension.dtype_reason(x.dtype)


def forward(x, weight, bias, residual, activation, save_pre_activation, row_scale=None):
    """-> (out (M, N), pre_activation (M, N) when activation == "gelu" and save_pre_activation, else empty (0,))."""
    gelu = activation == "gelu"
    if x.device.type == "cpu":
        return tuple(extension.ops().linear_forward(x, weight, bias, residual, gelu, save_pre_activation, row_scale))
    pre_activation = F.linear(x, weight, bias)
    out = F.gelu(pre_activation) if gelu else pre_activation
    if row_scale is not None:
        out = out * row_scale[:, None]
    if residual is not None:
        out = out + residual
    return out, (pre_activation if gelu and save_pre_activation else x.new_empty(0))


def backward(grad_out, x, weight, has_bias, pre_activation, activation):
    """-> (grad_x (M, K), grad_weight (N, K), grad_bias (N,) or empty (0,) without bias)."""
    grad_h = torch.ops.aten.gelu_backward(grad_out, pre_activation) if activation == "gelu" else grad_out
    grad_x = grad_h @ weight
    grad_weight = grad_h.t() @ x
    grad_bias = grad_h.sum(0, dtype=torch.float32).to(x.dtype) if has_bias else x.new_empty(0)
    return grad_x, grad_weight, grad_bias

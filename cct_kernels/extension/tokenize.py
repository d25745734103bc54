"""Tokenizer-stage kernels of the extension. Interface: cct_kernels/ops/tokenize.py.

Both backends run the convolution through ATen (oneDNN on CPU, cuDNN on CUDA) and then one fused pass of their own
for ReLU + max pool + output layout (tokens or NCHW) + the int8 pool_index; backward gathers the conv-output gradient
from pool_index and calls ATen's convolution_backward. The cpu backend's NCHW output and pool_index are
channels-last and its grad_x comes back in x's layout (the cuda backend's are row-major). On CPU, stems with
C_in*kh*kw <= 160 (grayscale and RGB, 3x3 and 7x7) take a direct path instead: per conv row a small patch GEMM,
pooled from cache (the full-resolution activation is never written), and a backward that accumulates the
weight/bias/input gradients from the gathered gradient and the patches in the same pass (for the 7x7 RGB stem only
with at least as many images as threads). float32/float16/bfloat16; pool kernel <= 11 (int8 index).
"""
from __future__ import annotations

from cct_kernels import extension

MAX_POOL_KERNEL = 11  # pool_index holds kh*k+kw in an int8


def unsupported(x, weight, bias, stride, padding, relu, pool_kernel, pool_stride, pool_padding, to_tokens, *,
                backend: str) -> str | None:
    reason = extension.dtype_reason(x.dtype)
    if reason is not None:
        return reason
    if pool_kernel > MAX_POOL_KERNEL:
        return f"pool kernel {pool_kernel} > {MAX_POOL_KERNEL} does not fit the int8 pool_index"
    return None


def forward(x, weight, bias, stride, padding, relu, pool_kernel, pool_stride, pool_padding, to_tokens):
    """-> (out, pool_index int8 of out's shape, empty when pool_kernel == 0)."""
    return tuple(extension.ops().tokenize_forward(
        x, weight, bias, stride, padding, relu, pool_kernel, pool_stride, pool_padding, to_tokens
    ))


def backward(grad_out, x, weight, bias, out, pool_index, stride, padding, relu, pool_kernel, pool_stride,
             pool_padding, to_tokens, needs_input_grad=True):
    """-> (grad_x (empty when not needs_input_grad), grad_weight, grad_bias (empty when bias is None))."""
    return tuple(extension.ops().tokenize_backward(
        grad_out, x, weight, bias, out, pool_index, stride, padding, relu, pool_kernel, pool_stride, pool_padding,
        to_tokens, needs_input_grad,
    ))

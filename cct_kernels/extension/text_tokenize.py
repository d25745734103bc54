"""Text tokenizer kernels of the extension: backend "cpu" (csrc/cpu/text_tokenize.cpp). Interface:
cct_kernels/ops/text_tokenize.py.

Forward: per task a band of tokens of one sequence; the conv rows it needs are one GEMM over the overlapping
windows of k word vectors read in place (a window is k*C contiguous values, the next one starts stride*C later),
then ReLU and the pool from cache. Backward: the conv-row gradient gathered from pool_index, grad_weight as per-chunk
GEMMs summed in a fixed order (deterministic), grad_x as one GEMM per band plus the overlapping windows' sum.
float32/float16/bfloat16 (computed in float32); pool kernel <= 127 (int8 pool_index).
"cuda" has no text tokenizer kernel: on a GPU the triton backend serves it (auto takes triton there).
"""
from __future__ import annotations

from cct_kernels import extension

MAX_POOL_KERNEL = 127  # pool_index holds the offset inside the window in an int8


def unsupported(x, weight, stride, padding, relu, pool_kernel, pool_stride, pool_padding, *,
                backend: str) -> str | None:
    if backend == "cuda":
        return "the extension has no cuda text_tokenize kernel; the triton backend serves CUDA tensors"
    reason = extension.dtype_reason(x.dtype)
    if reason is not None:
        return reason
    if pool_kernel > MAX_POOL_KERNEL:
        return f"pool kernel {pool_kernel} > {MAX_POOL_KERNEL} does not fit the int8 pool_index"
    if weight.shape[1] * weight.shape[2] * max(stride, 1) >= 2**31:
        return "a conv window (k * C values) must hold fewer than 2**31 values for the BLAS GEMM"
    return None


def forward(x, weight, stride, padding, relu, pool_kernel, pool_stride, pool_padding):
    """-> (out (B, N, E), pool_index int8 (B, N, E), empty when pool_kernel == 0)."""
    return tuple(extension.ops().text_tokenize_forward(
        x, weight, stride, padding, relu, pool_kernel, pool_stride, pool_padding))


def backward(grad_out, x, weight, out, pool_index, stride, padding, relu, pool_kernel, pool_stride, pool_padding,
             needs_input_grad=True):
    """-> (grad_x (empty when not needs_input_grad), grad_weight (E, k, C))."""
    return tuple(extension.ops().text_tokenize_backward(
        grad_out, x, weight, out, pool_index, stride, padding, relu, pool_kernel, pool_stride, pool_padding,
        needs_input_grad))

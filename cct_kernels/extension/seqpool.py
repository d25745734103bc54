"""SeqPool kernels of the extension: backend "cpu" (csrc/cpu/seqpool.cpp: one pass, online softmax, OpenMP over batch
and sequence chunks) and "cuda" (csrc/cuda/seqpool.cu: one block per batch row). Interface: cct_kernels/ops/seqpool.py.
x (B, N, D), weight (1, D), bias (1,), float32/float16/bfloat16; float32 accumulation; any B >= 0, N >= 1, D >= 1.
"""
from __future__ import annotations

from cct_kernels import extension


CUDA_MAX_N = 8192  # the cuda kernel keeps the N scores in shared memory (kSeqPoolMaxN in csrc/cuda/kernels.h)


def unsupported(x, weight, bias, *, backend: str) -> str | None:
    if backend == "cuda" and x.shape[1] > CUDA_MAX_N:
        return f"the cuda seqpool kernel needs N <= {CUDA_MAX_N}, got {x.shape[1]}"
    return extension.dtype_reason(x.dtype)


def forward(x, weight, bias):
    """-> (out (B, D) x.dtype, lse (B,) float32)."""
    return tuple(extension.ops().seqpool_forward(x, weight, bias))


def backward(grad_out, x, weight, bias, out, lse):
    """-> (grad_x (B, N, D), grad_weight (1, D), grad_bias (1,))."""
    return tuple(extension.ops().seqpool_backward(grad_out, x, weight, bias, out, lse))

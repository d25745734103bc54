"""SeqPool kernels of the extension: backend "cpu" (csrc/cpu/seqpool.cpp: one pass, online softmax, OpenMP over batch
and sequence chunks) and "cuda" (csrc/cuda/seqpool.cu: rows split over ~256 blocks, x read once in 16-byte
vectors, online softmax per warp, partials merged in a fixed order). Interface: cct_kernels/ops/seqpool.py.
x (B, N, D), weight (1, D), bias (1,), float32/float16/bfloat16; float32 accumulation; any B >= 0, N >= 1, D >= 1,
except "cuda": D <= cuda_max_d(x) (1024, or 256 when a row is not a multiple of 16 bytes).
Both take key-padding lengths ((B,) int64 on x's device, 0 <= lengths[b] <= N): the softmax runs over the first
lengths[b] tokens only (the kernels read only those), padded tokens get zero gradient, and a row with none gives
out 0 (lse -inf).
"""
from __future__ import annotations

from cct_kernels import extension


def cuda_max_d(x) -> int:
    """The largest D the cuda kernel takes for x (seqpool_cuda_max_d in csrc/cuda/kernels.h): a warp keeps its
    rows' accumulators in registers, 32 floats per lane, read in 16-byte vectors when a row is a multiple of them."""
    return 1024 if x.shape[2] % (16 // x.element_size()) == 0 else 256


def unsupported(x, weight, bias, lengths=None, *, backend: str) -> str | None:
    reason = extension.dtype_reason(x.dtype)
    if reason is None and backend == "cuda" and x.shape[2] > cuda_max_d(x):
        return (f"the cuda seqpool kernel needs D <= {cuda_max_d(x)} for this row size "
                f"(D = {x.shape[2]}, {x.dtype}); triton and eager take any D")
    return reason


def forward(x, weight, bias, lengths=None):
    """-> (out (B, D) float32, lse (B,) float32)."""
    return tuple(extension.ops().seqpool_forward(x, weight, bias, lengths))


def backward(grad_out, x, weight, bias, out, lse, lengths=None):
    """-> (grad_x (B, N, D), grad_weight (1, D), grad_bias (1,)); out: the forward's (float32)."""
    return tuple(extension.ops().seqpool_backward(grad_out, x, weight, bias, out, lse, lengths))

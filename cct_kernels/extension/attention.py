"""Attention kernels of the extension. Interface: cct_kernels/ops/attention.py; qkv (B, N, 3*H*d) -> (B, N, H*d).

"cpu" (csrc/cpu/attention.cpp): float32/float16/bfloat16 (computed in float32), any head dim, N < 65536, dropout
    from a counter-based hash of the seed (the same mask in backward; attention_dropout_mask() returns it).
"cuda" (csrc/cuda/attention_forward.cu, attention_backward.cu): tensor-core flash attention (mma.sync, float32
    accumulation, double-buffered cp.async loads) for head dim 64, float16/bfloat16 only, GPUs of compute capability
    8.0 or newer, no dropout (training with attention dropout falls back under "auto"). Its backward accumulates dQ
    with float atomics (16-byte vector atomics on sm_90), so it declines while torch.use_deterministic_algorithms(True)
    is on.
Both take key-padding lengths ((B,) int64 on qkv's device, 0 <= lengths[b] <= N: every query attends to the first
lengths[b] keys only; a sequence with none gives zeros and zero gradients). The cuda kernels skip key blocks past a
sequence's length (forward and backward), so a padded batch pays for its real keys.
"""
from __future__ import annotations

import torch

from cct_kernels import extension

CUDA_HEAD_DIM = 64


def unsupported(qkv, num_heads, scale, dropout_p, lengths=None, *, backend: str) -> str | None:
    head_dim = qkv.shape[2] // (3 * num_heads)
    if backend == "cuda":
        reason = extension.dtype_reason(qkv.dtype, (torch.float16, torch.bfloat16))
        if reason is not None:
            return reason + " by the cuda attention kernel (tensor cores); use the triton backend for float32"
        if qkv.is_cuda and torch.cuda.get_device_capability(qkv.device) < (8, 0):
            major, minor = torch.cuda.get_device_capability(qkv.device)
            return f"the cuda attention kernel needs compute capability 8.0+ (cp.async, bf16 mma), got {major}.{minor}"
        if head_dim != CUDA_HEAD_DIM:
            return f"the cuda attention kernel needs head dim {CUDA_HEAD_DIM}, got {head_dim}"
        if qkv.shape[0] * num_heads > 65535:
            return f"the cuda attention kernel needs batch * heads <= 65535 (grid.y), got {qkv.shape[0] * num_heads}"
        if dropout_p > 0:
            return "the cuda attention kernel has no dropout (dropout_p > 0); use triton or eager for training"
        if torch.are_deterministic_algorithms_enabled():
            return ("the cuda attention backward sums dQ with atomics (not bitwise reproducible) and "
                    "torch.use_deterministic_algorithms(True) is on; triton's backward is deterministic")
        return None
    reason = extension.dtype_reason(qkv.dtype)
    if reason is not None:
        return reason
    if qkv.shape[1] >= 65536:
        return f"the cpu attention kernel needs N < 65536, got {qkv.shape[1]}"
    return None


def forward(qkv, num_heads, scale, dropout_p, seed, lengths=None):
    """-> (out (B, N, H*d) qkv.dtype, lse (B, H, N) float32)."""
    return tuple(extension.ops().attention_forward(qkv, num_heads, scale, dropout_p, seed, lengths))


def backward(grad_out, qkv, out, lse, num_heads, scale, dropout_p, seed, lengths=None):
    """-> grad_qkv (B, N, 3*H*d)."""
    return extension.ops().attention_backward(grad_out, qkv, out, lse, num_heads, scale, dropout_p, seed, lengths)


def attention_dropout_mask(seed: torch.Tensor, batch: int, num_heads: int, seq_len: int, dropout_p: float):
    """The keep-mask (B, H, N, N) bool that the cpu kernels apply for this seed (for tests and debugging)."""
    return extension.ops().attention_dropout_mask(seed.cpu(), batch, num_heads, seq_len, dropout_p)

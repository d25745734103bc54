"""Eager reference implementations of every op: the oracle for tests and benchmarks, and the "eager" backend.

Plain PyTorch with autograd, written to be the same function as the official CCT code
(SHI-Labs/Compact-Transformers); see the op modules in cct_kernels/ops/ for shapes, dtypes and limits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def tokenize(x, weight, bias=None, *, stride=1, padding=0, relu=True, pool=(3, 2, 1), to_tokens=True):
    """One tokenizer stage: conv2d -> ReLU (if relu) -> max pool (kernel, stride, padding) (if pool) -> tokens.

    x (B, C_in, H, W); weight (C_out, C_in, k, k); returns (B, H'*W', C_out) if to_tokens else (B, C_out, H', W').
    """
    y = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    if relu:
        y = F.relu(y)
    if pool is not None:
        kernel, pool_stride, pool_padding = pool
        y = F.max_pool2d(y, kernel, pool_stride, pool_padding)
    if to_tokens:
        y = y.flatten(2).transpose(1, 2)
    return y


def text_tokenize(x, weight, *, stride=1, padding=0, relu=True, pool=(3, 2, 1)):
    """The text tokenizer stage, exactly the official modules: Conv2d(1, E, (k, C), stride (stride, 1), padding
    (padding, 0), no bias) -> ReLU (if relu) -> MaxPool2d((pk, 1), (ps, 1), (pp, 0)) (if pool) on x.unsqueeze(1).

    x (B, L, C); weight (E, 1, k, C) or (E, k, C); returns tokens (B, N, E).
    """
    weight = weight if weight.dim() == 4 else weight.unsqueeze(1)
    y = F.conv2d(x.unsqueeze(1), weight, stride=(stride, 1), padding=(padding, 0))
    if relu:
        y = F.relu(y)
    if pool is not None:
        kernel, pool_stride, pool_padding = pool
        y = F.max_pool2d(y, (kernel, 1), (pool_stride, 1), (pool_padding, 0))
    return y.squeeze(-1).transpose(1, 2)


def attention(qkv, num_heads, *, scale=None, dropout_p=0.0, dropout_mask=None, mask=None):
    """Multi-head self-attention on the packed output of the qkv projection.

    qkv (B, N, 3*D) laid out as (3, num_heads, D // num_heads) along the last dim, as the official
    `qkv(x).reshape(B, N, 3, H, d)`; returns (B, N, D) with heads merged, ready for the output projection.
    Dropout on the attention probabilities: with `dropout_mask` (B, H, N, N) of 0/1 values it is applied as
    given (scaled by 1/(1-p)), else drawn by F.dropout when dropout_p > 0.
    float16/bfloat16: scores and softmax are computed in float32 (as the kernels do; half-precision scores
    overflow to inf, and the softmax to NaN, once |q . k| passes 65504), the probabilities are rounded to the input
    dtype for the product with v. float32 and float64 run exactly the official computation.
    mask (B, N) bool, True = real token: every query attends to real keys only; a sequence with no real token
    gives zeros.
    """
    B, N, three_d = qkv.shape
    head_dim = three_d // (3 * num_heads)
    q, k, v = qkv.reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    scale = head_dim**-0.5 if scale is None else scale
    if qkv.dtype in (torch.float16, torch.bfloat16):
        scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    else:
        scores = (q @ k.transpose(-2, -1)) * scale
    attn = scores.softmax(dim=-1) if mask is None else _masked_softmax(scores, mask[:, None, None, :])
    attn = attn.to(qkv.dtype)
    if dropout_mask is not None:
        attn = attn * dropout_mask.to(attn.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        attn = F.dropout(attn, dropout_p)
    return (attn @ v).transpose(1, 2).reshape(B, N, num_heads * head_dim)


def seqpool(x, weight, bias, *, mask=None):
    """Sequence pooling: softmax over the sequence of x @ weight.T + bias, then the weighted sum of x.

    x (B, N, D); weight (1, D); bias (1,); returns (B, D). mask (B, N) bool, True = real token: the softmax
    runs over real tokens only (a sequence with none gives zeros).
    """
    return pool_by_scores(F.linear(x, weight, bias), x, mask=mask)


def pool_by_scores(scores, x, *, mask=None):
    """SeqPool's pooling of x (B, N, D) by scores (B, N, 1): softmax over the sequence (real tokens only with a
    (B, N) bool mask), then the weighted sum of x: (B, D)."""
    w = scores.softmax(dim=1) if mask is None else _masked_softmax(scores, mask[:, :, None], dim=1)
    return (w.transpose(-1, -2) @ x).squeeze(-2)


ACTIVATIONS = ("none", "gelu")


def linear(x, weight, bias=None, *, activation="none", residual=None, row_scale=None, dropout_p=0.0,
           dropout_mask=None, norm_weight=None, norm_bias=None, norm_eps=1e-5, input_norm_weight=None,
           input_norm_bias=None, input_norm_eps=1e-5):
    """A linear layer with its epilogue: dropout(activation(x @ weight.T + bias)) * row_scale + residual, then a
    LayerNorm over the last dim when norm_weight (N,) is given (norm_bias (N,) or None, norm_eps): the encoder
    block's proj, whose sum with the residual stream feeds norm1. With input_norm_weight (K,) x is first replaced by
    its LayerNorm (input_norm_bias (K,) or None, input_norm_eps): the block's pre_norm feeding qkv.

    x (..., K); weight (N, K); bias (N,) or None; residual (..., N) or None; activation "none" or "gelu" (the
    exact, erf-based GELU of F.gelu, as the official MLP uses); row_scale (...) or None, one factor per row (the
    encoder block's stochastic depth: 0 or 1 / keep_prob per sample). The encoder block's proj and linear2 take
    the residual stream as `residual`, linear1 takes activation="gelu". Dropout with rate dropout_p in [0, 1]
    (the official proj_drop, dropout1, dropout2): with `dropout_mask` (..., N) bool (True = kept) it is applied as
    given, kept values scaled by 1 / (1 - dropout_p); else drawn by F.dropout when dropout_p > 0.
    """
    if input_norm_weight is not None:
        x = F.layer_norm(x, input_norm_weight.shape, input_norm_weight, input_norm_bias, input_norm_eps)
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    if dropout_mask is not None:
        y = y * dropout_mask.to(y.dtype) * (1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0)
    elif dropout_p > 0.0:
        y = F.dropout(y, dropout_p)
    if row_scale is not None:
        y = y * row_scale.unsqueeze(-1)
    if residual is not None:
        y = y + residual
    if norm_weight is not None:
        y = F.layer_norm(y, norm_weight.shape, norm_weight, norm_bias, norm_eps)
    return y


def linear_grads(grad_h, x, weight, has_bias: bool):
    """The GEMM part of a linear's backward, by torch's matmuls (cuBLAS, MKL), from grad_h (M, N), the gradient at
    x @ weight.T + b for x (M, K) and weight (N, K): (grad_x = grad_h @ weight (M, K), grad_weight = grad_h^T @ x
    (N, K), grad_bias = grad_h's float32 column sums in x's dtype (N,), or an empty (0,) tensor without a bias)."""
    grad_bias = grad_h.sum(0, dtype=torch.float32).to(x.dtype) if has_bias else x.new_empty(0)
    return grad_h @ weight, grad_h.t() @ x, grad_bias


# The kernels' dropout hash, on uint32 values held in int64 tensors (C++: mix32 and dropout_key in csrc/cpu/common.h;
# Triton: cct_kernels/triton/linear.py). The products are split in 16-bit halves so that no int64 product overflows.
_U32 = 0xFFFFFFFF


def _mul32(x, c: int):
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _U32


def _mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_threshold(dropout_p: float) -> int:
    """The kernels drop an element when its 24 random bits are below this: dropout_p * 2**24 rounded half up (C++
    llround)."""
    return math.floor(dropout_p * 2**24 + 0.5)


def linear_dropout_mask(seed: torch.Tensor, rows: int, cols: int, dropout_p: float) -> torch.Tensor:
    """The (rows, cols) bool keep mask (True = kept) that every kernel backend of ops.linear draws for `seed` (an
    int64 tensor of one element) and dropout_p in [0, 1]: element (r, c) is kept iff
        mix32(key(seed, r) ^ mix32(c)) >> 8 >= dropout_threshold(dropout_p),
        key(seed, r) = mix32(mix32(lo ^ 0x85EBCA6B) ^ mix32(hi + 0x27D4EB2F) ^ mix32(r + 0x9E3779B9)),
    lo / hi the seed's low / high 32 bits and mix32 the lowbias32 integer hash, all modulo 2**32. A counter-based
    hash: forward and backward redraw the same mask from the seed, any element independently of the others.
    On seed's device, no host synchronisation (the cuda backend draws its mask with it)."""
    seed = seed.reshape(1).to(torch.int64)
    lo, hi = seed & _U32, (seed >> 32) & _U32
    seed_key = _mix32(lo ^ 0x85EBCA6B) ^ _mix32((hi + 0x27D4EB2F) & _U32)
    r = torch.arange(rows, dtype=torch.int64, device=seed.device)
    c = torch.arange(cols, dtype=torch.int64, device=seed.device)
    keys = _mix32(seed_key ^ _mix32((r + 0x9E3779B9) & _U32))
    bits = _mix32(keys[:, None] ^ _mix32(c)[None, :]) >> 8
    return bits >= dropout_threshold(dropout_p)


def _masked_softmax(scores, keep, dim=-1):
    """softmax over `dim` of the entries where `keep` (broadcast) is True; zero where no entry is kept."""
    probs = scores.masked_fill(~keep, float("-inf")).softmax(dim=dim)
    return probs.masked_fill(~keep, 0.0).nan_to_num(nan=0.0)

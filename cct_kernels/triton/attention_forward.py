"""The Triton attention forward kernel (flash-attention 2, online softmax) and the helpers every attention kernel
uses. Launched by cct_kernels/triton/attention.py, which documents layout, limits, precision and dropout."""
from __future__ import annotations

import triton
import triton.language as tl

from cct_kernels.triton.attention_dropout import _kept
from cct_kernels.triton.key_padding import real_tokens

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # the kernels can only read constexpr globals


@triton.jit
def _tile(base, rows, stride, col0, D: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointers (len(rows), BLOCK_D) to rows `rows` (row stride `stride`), columns col0 .. col0 + BLOCK_D - 1.

    ALIGNED (launcher-checked: 16-byte aligned base, strides and head offsets) states what Triton's launcher
    specialises anyway, so that the sm_90 compile check, which cannot pass that specialisation, sees the same
    16-byte vector loads; without it each thread holds a 64-bit pointer per element and spills."""
    ptrs = base + rows[:, None] * stride + col0 + tl.arange(0, BLOCK_D)[None, :]
    if ALIGNED:
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [1, 16]), [1, BLOCK_D])
    return ptrs


@triton.jit
def _load_pair(a_ptrs, b_ptrs, mask, UPCAST: tl.constexpr):
    """Two tiles under one mask (zeros outside), widened to float32 under UPCAST (the interpreter's bf16)."""
    a = tl.load(a_ptrs, mask=mask, other=0.0)
    b = tl.load(b_ptrs, mask=mask, other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def _attn_fwd(
    QKV, Out, Lse, Bits, Lengths,
    stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n,
    N, H, qk_scale, keep_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_LENGTHS: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head); streams the real keys (see key_padding.py).
    qk_scale = scale * log2(e).

    Every query row (padded ones too) attends to the real keys; a sequence without any writes out = 0, lse = -inf."""
    blocks = tl.cdiv(N, BLOCK_M)  # 1-D grid, the query blocks of one head adjacent: its K/V stay in L2
    bh = tl.program_id(0) // blocks
    b = bh // H
    h = bh % H
    row0 = (tl.program_id(0) % blocks) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = tl.arange(0, BLOCK_D)[None, :] < D
    qkv = QKV + b.to(tl.int64) * stride_qkv_b  # int64: B * N * 3 * H * d can pass 2**31
    kv_len = real_tokens(Lengths, b, N, HAS_LENGTHS)

    q = tl.load(_tile(qkv, rows, stride_qkv_n, h * D, D, BLOCK_D, ALIGNED), mask=(rows[:, None] < N) & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = _tile(qkv, offs_n, stride_qkv_n, (H + h) * D, D, BLOCK_D, ALIGNED)
    v_ptrs = _tile(qkv, offs_n, stride_qkv_n, (2 * H + h) * D, D, BLOCK_D, ALIGNED)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of scores (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i), before dropout
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, kv_len, BLOCK_N):
        cols = start + offs_n
        kv_mask = (cols[:, None] < kv_len) & d_ok
        k, v = _load_pair(k_ptrs + start * stride_qkv_n, v_ptrs + start * stride_qkv_n, kv_mask, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(cols[None, :] < kv_len, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_kept(Bits, bh, rows, start, N, BLOCK_M, BLOCK_N), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if HAS_LENGTHS:
        acc = acc * (keep_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]  # l_i = 0 (no real key): acc is 0
    else:
        acc = acc * (keep_scale / l_i)[:, None]
    out_ptrs = _tile(Out + b.to(tl.int64) * stride_out_b, rows, stride_out_n, h * D, D, BLOCK_D, ALIGNED)
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=(rows[:, None] < N) & d_ok)
    lse = (m_i + tl.log2(l_i)) / _LOG2E  # -inf without a real key
    tl.store(Lse + bh.to(tl.int64) * N + rows, lse, mask=rows < N)

"""The Triton attention backward kernels (flash-attention 2, no atomics): dQ (which also stores delta) then dK/dV.
Launched by cct_kernels/triton/attention.py, which documents layout, limits, precision and dropout."""
from __future__ import annotations

import triton
import triton.language as tl

from cct_kernels.triton.attention_dropout import _kept
from cct_kernels.triton.attention_forward import _LOG2E, _load_pair, _tile
from cct_kernels.triton.key_padding import real_tokens


@triton.jit
def _attn_bwd_dq(
    QKV, Out, dOut, Lse, Delta, dQKV, Bits, Lengths,
    stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n, stride_do_b, stride_do_n, stride_dqkv_b, stride_dqkv_n,
    N, H, scale, keep_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_LENGTHS: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: dQ for BLOCK_M queries of one (batch, head), streaming the real keys; also stores
    delta = rowsum(dO*O). Writes the q slot of dQKV (B, N, 3, H, d) with strides stride_dqkv_* (zeros for the rows
    of a sequence without real keys: its loop is empty)."""
    blocks = tl.cdiv(N, BLOCK_M)  # 1-D grid, the query blocks of one head adjacent: its K/V stay in L2
    bh = tl.program_id(0) // blocks
    b = bh // H
    h = bh % H
    row0 = (tl.program_id(0) % blocks) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = tl.arange(0, BLOCK_D)[None, :] < D
    row_mask = (rows[:, None] < N) & d_ok
    qkv = QKV + b.to(tl.int64) * stride_qkv_b
    kv_len = real_tokens(Lengths, b, N, HAS_LENGTHS)

    q = tl.load(_tile(qkv, rows, stride_qkv_n, h * D, D, BLOCK_D, ALIGNED), mask=row_mask, other=0.0)
    do = tl.load(_tile(dOut + b.to(tl.int64) * stride_do_b, rows, stride_do_n, h * D, D, BLOCK_D, ALIGNED),
                 mask=row_mask, other=0.0)
    o = tl.load(_tile(Out + b.to(tl.int64) * stride_out_b, rows, stride_out_n, h * D, D, BLOCK_D, ALIGNED),
                mask=row_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * N + rows, delta, mask=rows < N)
    lse2 = tl.load(Lse + bh.to(tl.int64) * N + rows, mask=rows < N, other=0.0) * _LOG2E
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    k_ptrs = _tile(qkv, offs_n, stride_qkv_n, (H + h) * D, D, BLOCK_D, ALIGNED)
    v_ptrs = _tile(qkv, offs_n, stride_qkv_n, (2 * H + h) * D, D, BLOCK_D, ALIGNED)
    qk_scale = scale * _LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, kv_len, BLOCK_N):
        cols = start + offs_n
        kv_mask = (cols[:, None] < kv_len) & d_ok
        k, v = _load_pair(k_ptrs + start * stride_qkv_n, v_ptrs + start * stride_qkv_n, kv_mask, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(cols[None, :] < kv_len, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _kept(Bits, bh, rows, start, N, BLOCK_M, BLOCK_N)
            ds = p * (tl.where(keep, dp, 0.0) * keep_scale - delta[:, None])  # one FFMA, as without dropout
        else:
            ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq_ptrs = _tile(dQKV + b.to(tl.int64) * stride_dqkv_b, rows, stride_dqkv_n, h * D, D, BLOCK_D, ALIGNED)
    tl.store(dq_ptrs, (dq * scale).to(dQKV.dtype.element_ty), mask=row_mask)


@triton.jit
def _attn_bwd_dkdv(
    QKV, dOut, Lse, Delta, dQKV, BitsT, Lengths,
    stride_qkv_b, stride_qkv_n, stride_do_b, stride_do_n, stride_dqkv_b, stride_dqkv_n,
    N, H, scale, keep_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_LENGTHS: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: dK and dV for BLOCK_N keys of one (batch, head), streaming queries in blocks of BLOCK_M.

    Works on transposed score tiles (keys x queries) so dK and dV accumulate without transposes.
    Reads delta written by _attn_bwd_dq (launched first). Writes the k and v slots of dQKV: zeros, without a query
    loop, for a key block entirely past the sequence's real tokens."""
    blocks = tl.cdiv(N, BLOCK_N)  # 1-D grid, the key blocks of one head adjacent: its Q/dO stay in L2
    bh = tl.program_id(0) // blocks
    b = bh // H
    h = bh % H
    col0 = (tl.program_id(0) % blocks) * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)  # key indices
    offs_m = tl.arange(0, BLOCK_M)
    d_ok = tl.arange(0, BLOCK_D)[None, :] < D
    col_mask = (cols[:, None] < N) & d_ok
    qkv = QKV + b.to(tl.int64) * stride_qkv_b
    kv_len = real_tokens(Lengths, b, N, HAS_LENGTHS)
    q_len = N
    if HAS_LENGTHS:
        q_len = tl.where(col0 < kv_len, N, 0)  # no real key in this block: its gradients are zeros

    kv_mask = (cols[:, None] < kv_len) & d_ok
    k = tl.load(_tile(qkv, cols, stride_qkv_n, (H + h) * D, D, BLOCK_D, ALIGNED), mask=kv_mask, other=0.0)
    v = tl.load(_tile(qkv, cols, stride_qkv_n, (2 * H + h) * D, D, BLOCK_D, ALIGNED), mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_ptrs = _tile(qkv, offs_m, stride_qkv_n, h * D, D, BLOCK_D, ALIGNED)
    do_ptrs = _tile(dOut + b.to(tl.int64) * stride_do_b, offs_m, stride_do_n, h * D, D, BLOCK_D, ALIGNED)
    qk_scale = scale * _LOG2E

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, q_len, BLOCK_M):
        rows = start + offs_m
        row_mask = (rows[:, None] < N) & d_ok
        q, do = _load_pair(q_ptrs + start * stride_qkv_n, do_ptrs + start * stride_do_n, row_mask, UPCAST)
        lse2 = tl.load(Lse + bh.to(tl.int64) * N + rows, mask=rows < N, other=0.0) * _LOG2E
        delta = tl.load(Delta + bh.to(tl.int64) * N + rows, mask=rows < N, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p_t = tl.where(rows[None, :] < N, tl.exp2(s_t - lse2[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DROPOUT:
            keep_t = _kept(BitsT, bh, cols, start, N, BLOCK_N, BLOCK_M)  # key-major bits
            # The kept probabilities in the input dtype feed both dV (keep_scale multiplies it once, at the end)
            # and dS: the mask is then applied once, before the accumulator-to-operand conversion (applied after
            # it, the flags themselves are converted: 8% more instructions). dS = p' dp / (1 - p) - p delta
            # (p' = kept p) takes p' rounded like its dV use, one rounding more before dS's own rounding to q's
            # dtype.
            kept_t = tl.where(keep_t, p_t, 0.0).to(do.dtype)
            dv += tl.dot(kept_t, do, input_precision=PRECISION)
            ds_t = kept_t.to(tl.float32) * dp_t * keep_scale - p_t * delta[None, :]
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    if HAS_LENGTHS:
        # Padded keys of the partial block: row j of dK and dV depends on key j alone, so masking the sums once
        # here is exact (and costs nothing per query block).
        dk = tl.where(cols[:, None] < kv_len, dk, 0.0)
        dv = tl.where(cols[:, None] < kv_len, dv, 0.0)
    dqkv = dQKV + b.to(tl.int64) * stride_dqkv_b
    dk_ptrs = _tile(dqkv, cols, stride_dqkv_n, (H + h) * D, D, BLOCK_D, ALIGNED)
    dv_ptrs = _tile(dqkv, cols, stride_dqkv_n, (2 * H + h) * D, D, BLOCK_D, ALIGNED)
    tl.store(dk_ptrs, (dk * scale).to(dQKV.dtype.element_ty), mask=col_mask)
    if DROPOUT:
        dv = dv * keep_scale
    tl.store(dv_ptrs, dv.to(dQKV.dtype.element_ty), mask=col_mask)

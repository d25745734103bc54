"""Flash attention (forward and backward) in Triton, reading q/k/v straight out of the packed qkv projection.

Kernel-module interface of cct_kernels.backends for the op cct_kernels.ops.attention:
    unsupported(qkv, num_heads, scale, dropout_p, *, backend) -> str | None
    forward(qkv, num_heads, scale, dropout_p, seed) -> (out (B, N, H*d) qkv.dtype, lse (B, H, N) float32)
    backward(grad_out, qkv, out, lse, num_heads, scale, dropout_p, seed) -> grad_qkv (B, N, 3*H*d) qkv.dtype
    dropout_mask(seed, B, H, N, dropout_p, device) -> (B, H, N, N) bool keep mask the kernels use (for tests)

Layout: qkv (B, N, 3*H*d) is read as (B, N, 3, H, d) through strides (last dim contiguous); out is written as
(B, N, H*d) and grad_qkv as (B, N, 3, H, d), so no permute copies. lse is the natural-log softmax normaliser
(log-sum-exp of the scaled scores) per row, which the backward uses to recompute probabilities.

Algorithm: flash-attention 2. The forward streams key/value blocks with an online softmax and never holds an
N x N matrix. The backward runs two kernels and no atomics (deterministic): the dQ kernel (one program per query
block, streaming keys) also computes delta = rowsum(dO * O) and stores it; the dK/dV kernel (one program per key
block, streaming queries) runs after it and reads delta.

Limits: float32, float16, bfloat16; head dim d <= 128 (d is padded to a power of two >= 16 with masks; 64, the
CCT head dim, wastes nothing); any N >= 1 (key/query blocks are masked); B * H * ceil(N / 32) <= 2**31 - 1 (the
1-D grid: program p runs block p % blocks of head p // blocks, so the blocks of one head run together and its
K/V (Q/dO for dK/dV) stay in L2).
Precision: products in tl.dot accumulate in float32, softmax statistics are float32. float16/bfloat16 inputs
feed the tensor cores directly (wgmma on sm_90); probabilities and dS are rounded to the input dtype before their
matmuls, as in flash-attention. float32 inputs follow torch.backends.cuda.matmul.allow_tf32, read at each call:
True -> TF32 tensor cores (10-bit mantissa products, like torch.matmul under the same flag); False (torch's
default) -> exact fp32 FMA products ('ieee'), matching an fp32 reference computed with TF32 off. Use bf16/fp16
for speed.
Dropout (attention-probability dropout, the official attn_drop): a small kernel (attention_dropout.py) draws
the keep mask as bits, (B*H, N, ceil(N/32)) int32, from Philox4x32-7 keyed on the int64 seed tensor (one byte per
key: the drop rate is p rounded to a multiple of 1/256; kept probabilities are scaled by 1 / (1 - p)). The
forward and both backward kernels read those bits (the backward redraws them: B*H*N*N/8 bytes are cheaper to
redraw than to keep), so every kernel and dropout_mask() see the same mask.
Under TRITON_INTERPRET=1 (CPU tensors, tests only) bfloat16 values are upcast to float32 right after loading,
since the interpreter computes bfloat16 arithmetic wrongly.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from cct_kernels.triton.attention_dropout import (  # noqa: F401 (dropout_mask, dropout_threshold: interface)
    _dropout_bits, _kept, _kept_t, dropout_mask, dropout_threshold,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # the kernels can only read constexpr globals


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


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
def _attn_fwd(
    QKV, Out, Lse, Bits,
    stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n,
    N, H, qk_scale, words_per_row, keep_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head); streams all keys. qk_scale = scale * log2(e)."""
    blocks = tl.cdiv(N, BLOCK_M)  # 1-D grid, the query blocks of one head adjacent: its K/V stay in L2
    bh = tl.program_id(0) // blocks
    b = bh // H
    h = bh % H
    row0 = (tl.program_id(0) % blocks) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = tl.arange(0, BLOCK_D)[None, :] < D
    qkv = QKV + b.to(tl.int64) * stride_qkv_b  # int64: B * N * 3 * H * d can pass 2**31

    q = tl.load(_tile(qkv, rows, stride_qkv_n, h * D, D, BLOCK_D, ALIGNED), mask=(rows[:, None] < N) & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = _tile(qkv, offs_n, stride_qkv_n, (H + h) * D, D, BLOCK_D, ALIGNED)
    v_ptrs = _tile(qkv, offs_n, stride_qkv_n, (2 * H + h) * D, D, BLOCK_D, ALIGNED)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of scores (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i), before dropout
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        kv_mask = (cols[:, None] < N) & d_ok
        k = tl.load(k_ptrs + start * stride_qkv_n, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + start * stride_qkv_n, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(cols[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_kept(Bits, bh, rows, start, N, words_per_row, BLOCK_M, BLOCK_N), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    acc = acc * (keep_scale / l_i)[:, None]
    out_ptrs = _tile(Out + b.to(tl.int64) * stride_out_b, rows, stride_out_n, h * D, D, BLOCK_D, ALIGNED)
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=(rows[:, None] < N) & d_ok)
    lse = (m_i + tl.log2(l_i)) / _LOG2E
    tl.store(Lse + bh.to(tl.int64) * N + rows, lse, mask=rows < N)


@triton.jit
def _attn_bwd_dq(
    QKV, Out, dOut, Lse, Delta, dQKV, Bits,
    stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n, stride_do_b, stride_do_n, stride_dqkv_b, stride_dqkv_n,
    N, H, scale, words_per_row, keep_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: dQ for BLOCK_M queries of one (batch, head), streaming keys; also stores delta = rowsum(dO*O).

    Writes the q slot of dQKV (B, N, 3, H, d) with strides stride_dqkv_*."""
    blocks = tl.cdiv(N, BLOCK_M)  # 1-D grid, the query blocks of one head adjacent: its K/V stay in L2
    bh = tl.program_id(0) // blocks
    b = bh // H
    h = bh % H
    row0 = (tl.program_id(0) % blocks) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_mask = (rows[:, None] < N) & (tl.arange(0, BLOCK_D)[None, :] < D)
    qkv = QKV + b.to(tl.int64) * stride_qkv_b

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
    for start in range(0, N, BLOCK_N):
        cols = start + offs_n
        kv_mask = (cols[:, None] < N) & (tl.arange(0, BLOCK_D)[None, :] < D)
        k = tl.load(k_ptrs + start * stride_qkv_n, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + start * stride_qkv_n, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(cols[None, :] < N, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _kept(Bits, bh, rows, start, N, words_per_row, BLOCK_M, BLOCK_N)
            ds = p * (tl.where(keep, dp, 0.0) * keep_scale - delta[:, None])  # one FFMA, as without dropout
        else:
            ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq_ptrs = _tile(dQKV + b.to(tl.int64) * stride_dqkv_b, rows, stride_dqkv_n, h * D, D, BLOCK_D, ALIGNED)
    tl.store(dq_ptrs, (dq * scale).to(dQKV.dtype.element_ty), mask=row_mask)


@triton.jit
def _attn_bwd_dkdv(
    QKV, dOut, Lse, Delta, dQKV, Bits,
    stride_qkv_b, stride_qkv_n, stride_do_b, stride_do_n, stride_dqkv_b, stride_dqkv_n,
    N, H, scale, words_per_row, keep_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: dK and dV for BLOCK_N keys of one (batch, head), streaming queries in blocks of BLOCK_M.

    Works on transposed score tiles (keys x queries) so dK and dV accumulate without transposes.
    Reads delta written by _attn_bwd_dq (launched first). Writes the k and v slots of dQKV."""
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

    k = tl.load(_tile(qkv, cols, stride_qkv_n, (H + h) * D, D, BLOCK_D, ALIGNED), mask=col_mask, other=0.0)
    v = tl.load(_tile(qkv, cols, stride_qkv_n, (2 * H + h) * D, D, BLOCK_D, ALIGNED), mask=col_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_ptrs = _tile(qkv, offs_m, stride_qkv_n, h * D, D, BLOCK_D, ALIGNED)
    do_ptrs = _tile(dOut + b.to(tl.int64) * stride_do_b, offs_m, stride_do_n, h * D, D, BLOCK_D, ALIGNED)
    qk_scale = scale * _LOG2E

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + offs_m
        row_mask = (rows[:, None] < N) & d_ok
        q = tl.load(q_ptrs + start * stride_qkv_n, mask=row_mask, other=0.0)
        do = tl.load(do_ptrs + start * stride_do_n, mask=row_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(Lse + bh.to(tl.int64) * N + rows, mask=rows < N, other=0.0) * _LOG2E
        delta = tl.load(Delta + bh.to(tl.int64) * N + rows, mask=rows < N, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p_t = tl.where(rows[None, :] < N, tl.exp2(s_t - lse2[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DROPOUT:
            keep_t = _kept_t(Bits, bh, rows, col0, N, words_per_row, BLOCK_M, BLOCK_N)
            # keep_scale multiplies dV once, at the end
            dv += tl.dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do, input_precision=PRECISION)
            ds_t = p_t * (tl.where(keep_t, dp_t, 0.0) * keep_scale - delta[None, :])
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    dqkv = dQKV + b.to(tl.int64) * stride_dqkv_b
    dk_ptrs = _tile(dqkv, cols, stride_dqkv_n, (H + h) * D, D, BLOCK_D, ALIGNED)
    dv_ptrs = _tile(dqkv, cols, stride_dqkv_n, (2 * H + h) * D, D, BLOCK_D, ALIGNED)
    tl.store(dk_ptrs, (dk * scale).to(dQKV.dtype.element_ty), mask=col_mask)
    if DROPOUT:
        dv = dv * keep_scale
    tl.store(dv_ptrs, dv.to(dQKV.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------------------------------------
# configs: a small heuristic table (no autotuning: the interpreter cannot autotune, and these shapes are few)
# ----------------------------------------------------------------------------------------------------------

# (pass, float32 input?, BLOCK_D <= 64?, dropout?) -> (BLOCK_M, BLOCK_N, num_warps, num_stages); dropout None =
# either. fwd and dq: BLOCK_M queries per program, BLOCK_N keys per step; dkdv: BLOCK_N keys per program, BLOCK_M
# queries per step. Chosen from the sm_90 figures (benchmarks/results/sm90_static.json): no spills, fewest SASS
# instructions per score element. With dropout the keep bits arrive as words that each thread expands (a layout
# conversion through shared memory): the d=64 forward then does best with 8 warps and 128-key steps. float32 runs
# dot on FMA units unless TF32 is allowed (smaller tiles, 8 warps). BLOCK_N must stay a multiple of 32 (one word of
# keep bits).
_CONFIGS = {
    ("fwd", False, True, False): (128, 64, 4, 3),
    ("fwd", False, True, True): (128, 128, 8, 3),
    ("fwd", False, False, None): (128, 64, 8, 3),
    ("fwd", True, True, None): (64, 32, 8, 2),
    ("fwd", True, False, False): (64, 32, 8, 2),
    ("fwd", True, False, True): (32, 32, 8, 2),  # 64 queries spill 36 bytes with dropout
    ("dq", False, True, None): (64, 64, 4, 2),
    ("dq", False, False, None): (64, 64, 8, 2),
    ("dq", True, True, False): (32, 32, 8, 2),  # 64 queries: ptxas spills 8 bytes at 80 registers
    ("dq", True, True, True): (32, 32, 4, 2),  # 8 warps spill 8 bytes at 64 registers with dropout
    ("dq", True, False, None): (32, 32, 8, 2),
    ("dkdv", False, True, None): (64, 64, 4, 2),
    ("dkdv", False, False, None): (32, 128, 8, 2),
    ("dkdv", True, True, None): (32, 64, 8, 2),
    ("dkdv", True, False, None): (32, 32, 8, 1),
}
MIN_BLOCK_M = 64  # one warpgroup's wgmma tile


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _config(kind: str, dtype: torch.dtype, head_dim: int, dropout: bool, N: int) -> tuple[int, int, int, int]:
    """The table's entry, with both block sizes cut to N rounded up to a power of two (at least MIN_BLOCK_M
    queries, 32 keys): at N = 64 (cct_2) a 128-wide tile would be half padding (and half the programs)."""
    key = (kind, dtype == torch.float32, _block_d(head_dim) <= 64)
    block_m, block_n, num_warps, num_stages = _CONFIGS.get(key + (dropout,)) or _CONFIGS[key + (None,)]
    fit = triton.next_power_of_2(N)
    cut_m, cut_n = min(block_m, max(MIN_BLOCK_M, fit)), min(block_n, max(32, fit))
    if (cut_m, cut_n) != (block_m, block_n) and dtype != torch.float32 and head_dim <= 64:
        num_warps = 4  # a cut 16-bit tile (at most 64 x 64): one warpgroup; 8 warps would idle on overhead
    return cut_m, cut_n, num_warps, num_stages


def _precision(dtype: torch.dtype) -> str:
    """tl.dot precision: float32 inputs follow torch.backends.cuda.matmul.allow_tf32 (TF32 tensor cores when
    allowed, exact 'ieee' FMA products otherwise); 16-bit inputs always use tensor cores."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


# ----------------------------------------------------------------------------------------------------------
# launchers (the kernel-module interface)
# ----------------------------------------------------------------------------------------------------------


def unsupported(qkv: torch.Tensor, num_heads: int, scale: float, dropout_p: float, lengths=None, *,
                backend: str = "triton"):
    """Why these kernels cannot run this call (a sentence), or None when they can."""
    if lengths is not None:
        return "triton attention takes no key-padding lengths yet"
    if qkv.dtype not in DTYPES:
        return f"triton attention supports float32, float16 and bfloat16, got {qkv.dtype}"
    head_dim = qkv.shape[2] // (3 * num_heads)
    if head_dim > MAX_HEAD_DIM:
        return f"triton attention supports head dim <= {MAX_HEAD_DIM}, got {head_dim}"
    if qkv.numel() == 0:
        return "triton attention needs a non-empty qkv"
    if qkv.stride(2) != 1:
        return "triton attention needs qkv's last dim contiguous"
    programs = qkv.shape[0] * num_heads * triton.cdiv(qkv.shape[1], 32)
    if programs > 2**31 - 1:
        return f"triton attention needs batch * num_heads * ceil(N / 32) < 2**31 (its grid), got {programs}"
    return None


def _upcast(t: torch.Tensor) -> bool:
    # The interpreter computes bfloat16 arithmetic wrongly; compute in float32 there.
    return t.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _aligned(*tensors: torch.Tensor, head_dim: int) -> bool:
    """16-byte aligned base pointers, row/batch strides and head offsets: the loads can be 16-byte vectors."""
    size = tensors[0].element_size()
    return (head_dim * size) % 16 == 0 and all(
        t.data_ptr() % 16 == 0 and all((st * size) % 16 == 0 for st in t.stride()[:-1]) for t in tensors
    )


def forward(qkv, num_heads, scale, dropout_p, seed, lengths=None, *, out=None, lse=None):
    """Attention forward. qkv (B, N, 3*H*d) fp32/fp16/bf16 with a contiguous last dim; seed int64 (1,) if
    dropout_p > 0. Returns out (B, N, H*d) qkv.dtype and lse (B, H, N) float32. `out`/`lse` may be given
    preallocated (tests fill them with NaN to catch unwritten elements)."""
    B, N, three_hd = qkv.shape
    H = num_heads
    D = three_hd // (3 * H)
    if out is None:
        out = torch.empty(B, N, H * D, dtype=qkv.dtype, device=qkv.device)
    if lse is None:
        lse = torch.empty(B, H, N, dtype=torch.float32, device=qkv.device)
    bits, words = _dropout_bits(seed, B, H, N, dropout_p, qkv.device)
    BLOCK_M, BLOCK_N, num_warps, num_stages = _config("fwd", qkv.dtype, D, dropout_p > 0, N)
    _attn_fwd[(B * H * triton.cdiv(N, BLOCK_M),)](
        qkv, out, lse, bits,
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        N, H, scale * LOG2E, words, 1.0 / (1.0 - dropout_p),
        D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(D), DROPOUT=dropout_p > 0, UPCAST=_upcast(qkv),
        ALIGNED=_aligned(qkv, out, head_dim=D), PRECISION=_precision(qkv.dtype), num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, lse


def backward(grad_out, qkv, out, lse, num_heads, scale, dropout_p, seed, lengths=None, *, grad_qkv=None):
    """Attention backward. grad_out and out (B, N, H*d), qkv (B, N, 3*H*d), all of one dtype with contiguous
    last dims; lse (B, H, N) float32 contiguous from forward(); the same seed as the forward. Returns grad_qkv
    (B, N, 3*H*d) qkv.dtype, contiguous (every element written: dq, dk, dv slots); it may be given preallocated
    (any strides with a contiguous last dim)."""
    B, N, three_hd = qkv.shape
    H = num_heads
    D = three_hd // (3 * H)
    if grad_qkv is None:
        grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    lse = lse.contiguous()
    delta = torch.empty(B, H, N, dtype=torch.float32, device=qkv.device)
    bits, words = _dropout_bits(seed, B, H, N, dropout_p, qkv.device)  # redrawn: cheaper than keeping B*H*N*N/8 bytes
    common = dict(D=D, BLOCK_D=_block_d(D), DROPOUT=dropout_p > 0, UPCAST=_upcast(qkv),
                  ALIGNED=_aligned(qkv, out, grad_out, grad_qkv, head_dim=D), PRECISION=_precision(qkv.dtype))
    keep_scale = 1.0 / (1.0 - dropout_p)

    BLOCK_M, BLOCK_N, num_warps, num_stages = _config("dq", qkv.dtype, D, dropout_p > 0, N)
    _attn_bwd_dq[(B * H * triton.cdiv(N, BLOCK_M),)](
        qkv, out, grad_out, lse, delta, grad_qkv, bits,
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
        grad_qkv.stride(0), grad_qkv.stride(1),
        N, H, scale, words, keep_scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps, num_stages=num_stages, **common,
    )
    BLOCK_M, BLOCK_N, num_warps, num_stages = _config("dkdv", qkv.dtype, D, dropout_p > 0, N)
    _attn_bwd_dkdv[(B * H * triton.cdiv(N, BLOCK_N),)](
        qkv, grad_out, lse, delta, grad_qkv, bits,
        qkv.stride(0), qkv.stride(1), grad_out.stride(0), grad_out.stride(1), grad_qkv.stride(0), grad_qkv.stride(1),
        N, H, scale, words, keep_scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps, num_stages=num_stages, **common,
    )
    return grad_qkv


# ----------------------------------------------------------------------------------------------------------
# sm_90 compile checks (cct_kernels/triton/sm90.py): the launchers themselves, on meta tensors
# ----------------------------------------------------------------------------------------------------------


def _sm90_check(dtype: torch.dtype, head_dim: int, dropout: bool, backward_pass: bool, N: int = 256,
                B: int = 2, H: int = 4, tf32: bool = False) -> dict:
    """forward() (or backward()) on meta tensors of (B, N, H, head_dim): sm90.py compiles what they launch."""
    p = 0.1 if dropout else 0.0

    def launch():
        allowed = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            run()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allowed

    def run():
        qkv = torch.empty(B, N, 3 * H * head_dim, dtype=dtype, device="meta")
        seed = torch.empty(1, dtype=torch.int64, device="meta")
        if not backward_pass:
            forward(qkv, H, head_dim**-0.5, p, seed)
            return
        out = torch.empty(B, N, H * head_dim, dtype=dtype, device="meta")
        lse = torch.empty(B, H, N, dtype=torch.float32, device="meta")
        backward(torch.empty_like(out), qkv, out, lse, H, head_dim**-0.5, p, seed)

    name = (f"{'bwd' if backward_pass else 'fwd'}_{str(dtype).split('.')[-1]}{'_tf32' if tf32 else ''}_d{head_dim}_N{N}"
            f"{'_dropout' if dropout else ''}")
    return {"name": name, "launch": launch, "score_elements": lambda kw: kw["BLOCK_M"] * kw["BLOCK_N"]}


# fp16 compiles like bf16 (same tiles, same wgmma shapes); d=64 and d=128 cover both tile classes, d=80 the
# masked head dim; N=196 (the 224 models) is not a multiple of 16, N=64 (cct_2) is one short block.
SM90_CHECKS = [
    _sm90_check(dtype, head_dim, dropout, backward_pass)
    for dtype in (torch.bfloat16, torch.float32)
    for head_dim in (64, 128)
    for dropout in (False, True)
    for backward_pass in (False, True)
] + [
    _sm90_check(torch.bfloat16, head_dim, dropout, backward_pass, N=N)
    for head_dim, N in ((80, 256), (64, 196), (64, 64))
    for dropout in (False, True)
    for backward_pass in (False, True)
] + [_sm90_check(torch.float32, 64, False, backward_pass, tf32=True) for backward_pass in (False, True)]

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
CCT head dim, wastes nothing); any N >= 1 (key/query blocks are masked); B * H <= 2**31 - 1 (grid axis 0; the
query/key blocks go on axis 1, at most 65535 of them: N <= 65535 * 32).
Precision: products in tl.dot accumulate in float32, softmax statistics are float32. float16/bfloat16 inputs
feed the tensor cores directly (wgmma on sm_90); probabilities and dS are rounded to the input dtype before their
matmuls, as in flash-attention. float32 inputs use input_precision="ieee" (no TF32), so they match an fp32
reference computed with TF32 off; use bf16/fp16 for speed.
Dropout (attention-probability dropout, the official attn_drop): keep(b, h, i, j) = uniform >= dropout_p with
the uniform from Philox4x32-7 keyed on the int64 seed tensor and countered by (key j, query i, b*H + h), so the
forward, both backward kernels and dropout_mask() draw the same mask without storing it. Kept probabilities
are scaled by 1 / (1 - dropout_p).
Under TRITON_INTERPRET=1 (CPU tensors, tests only) bfloat16 values are upcast to float32 right after loading,
since the interpreter computes bfloat16 arithmetic wrongly.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # the kernels can only read constexpr globals
_PHILOX_ROUNDS = tl.constexpr(7)  # Philox4x32-7 passes BigCrush (Salmon et al., 2011); 10 rounds would cost 40% more ALU.


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _dropout_keep(seed, bh, rows, cols, dropout_p):
    """Keep mask (broadcast shape of rows, cols) for queries `rows`, keys `cols` of head bh: one Philox draw per
    (b, h, i, j), counters (j, i, bh, 0), key `seed`; the same function in every kernel makes the masks agree."""
    zero = (rows + cols) * 0
    c0 = (cols + zero).to(tl.uint32)
    c1 = (rows + zero).to(tl.uint32)
    c2 = (zero + bh).to(tl.uint32)
    r, _, _, _ = tl.philox(seed, c0, c1, c2, zero.to(tl.uint32), _PHILOX_ROUNDS)
    return tl.uint_to_uniform_float(r) >= dropout_p


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
    QKV, Out, Lse, Seed,
    stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n,
    N, H, qk_scale, dropout_p, keep_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head); streams all keys. qk_scale = scale * log2(e)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = tl.arange(0, BLOCK_D)[None, :] < D
    qkv = QKV + b.to(tl.int64) * stride_qkv_b  # int64: B * N * 3 * H * d can pass 2**31

    q = tl.load(_tile(qkv, rows, stride_qkv_n, h * D, D, BLOCK_D, ALIGNED), mask=(rows[:, None] < N) & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = _tile(qkv, offs_n, stride_qkv_n, (H + h) * D, D, BLOCK_D, ALIGNED)
    v_ptrs = _tile(qkv, offs_n, stride_qkv_n, (2 * H + h) * D, D, BLOCK_D, ALIGNED)
    if DROPOUT:
        seed = tl.load(Seed)

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
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where(cols[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, rows[:, None], cols[None, :], dropout_p), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    acc = acc * (keep_scale / l_i)[:, None]
    out_ptrs = _tile(Out + b.to(tl.int64) * stride_out_b, rows, stride_out_n, h * D, D, BLOCK_D, ALIGNED)
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=(rows[:, None] < N) & d_ok)
    lse = (m_i + tl.log2(l_i)) / _LOG2E
    tl.store(Lse + bh.to(tl.int64) * N + rows, lse, mask=rows < N)


@triton.jit
def _attn_bwd_dq(
    QKV, Out, dOut, Lse, Delta, dQKV, Seed,
    stride_qkv_b, stride_qkv_n, stride_out_b, stride_out_n, stride_do_b, stride_do_n, stride_dqkv_b, stride_dqkv_n,
    N, H, scale, dropout_p, keep_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
):
    """One program: dQ for BLOCK_M queries of one (batch, head), streaming keys; also stores delta = rowsum(dO*O).

    Writes the q slot of dQKV (B, N, 3, H, d) with strides stride_dqkv_*."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
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
    if DROPOUT:
        seed = tl.load(Seed)
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
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        p = tl.where(cols[None, :] < N, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        if DROPOUT:
            keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], dropout_p)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")

    dq_ptrs = _tile(dQKV + b.to(tl.int64) * stride_dqkv_b, rows, stride_dqkv_n, h * D, D, BLOCK_D, ALIGNED)
    tl.store(dq_ptrs, (dq * scale).to(dQKV.dtype.element_ty), mask=row_mask)


@triton.jit
def _attn_bwd_dkdv(
    QKV, dOut, Lse, Delta, dQKV, Seed,
    stride_qkv_b, stride_qkv_n, stride_do_b, stride_do_n, stride_dqkv_b, stride_dqkv_n,
    N, H, scale, dropout_p, keep_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
):
    """One program: dK and dV for BLOCK_N keys of one (batch, head), streaming queries in blocks of BLOCK_M.

    Works on transposed score tiles (keys x queries) so dK and dV accumulate without transposes.
    Reads delta written by _attn_bwd_dq (launched first). Writes the k and v slots of dQKV."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # key indices
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
    if DROPOUT:
        seed = tl.load(Seed)
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
        s_t = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale
        p_t = tl.where(rows[None, :] < N, tl.exp2(s_t - lse2[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        if DROPOUT:
            keep_t = _dropout_keep(seed, bh, rows[None, :], cols[:, None], dropout_p)
            dv += tl.dot(tl.where(keep_t, p_t * keep_scale, 0.0).to(do.dtype), do, input_precision="ieee")
            dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision="ieee")

    dqkv = dQKV + b.to(tl.int64) * stride_dqkv_b
    dk_ptrs = _tile(dqkv, cols, stride_dqkv_n, (H + h) * D, D, BLOCK_D, ALIGNED)
    dv_ptrs = _tile(dqkv, cols, stride_dqkv_n, (2 * H + h) * D, D, BLOCK_D, ALIGNED)
    tl.store(dk_ptrs, (dk * scale).to(dQKV.dtype.element_ty), mask=col_mask)
    tl.store(dv_ptrs, dv.to(dQKV.dtype.element_ty), mask=col_mask)


@triton.jit
def _dropout_mask_kernel(Mask, Seed, N, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the (N, N) keep mask (uint8) of head bh = program_id(0) for BLOCK_M query rows."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    seed = tl.load(Seed)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], dropout_p)
        ptrs = Mask + bh.to(tl.int64) * N * N + rows[:, None] * N + cols[None, :]
        tl.store(ptrs, keep.to(tl.uint8), mask=(rows[:, None] < N) & (cols[None, :] < N))


# ----------------------------------------------------------------------------------------------------------
# configs: a small heuristic table (no autotuning: the interpreter cannot autotune, and these shapes are few)
# ----------------------------------------------------------------------------------------------------------

# (pass, float32 input?, BLOCK_D <= 64?, dropout?) -> (BLOCK_M, BLOCK_N, num_warps, num_stages); dropout None =
# either. fwd and dq: BLOCK_M queries per program, BLOCK_N keys per step; dkdv: BLOCK_N keys per program, BLOCK_M
# queries per step. Each entry is the largest tile found to compile for sm_90 without spills (SM90_CHECKS lists
# them all). Philox keeps 4 words per element live, so the d=64 forward with dropout takes 8 warps to halve the
# elements per thread. float32 runs dot on FMA units (ieee, no tensor cores): smaller tiles, 8 warps.
_CONFIGS = {
    ("fwd", False, True, False): (128, 64, 4, 3),
    ("fwd", False, True, True): (128, 64, 8, 3),
    ("fwd", False, False, None): (128, 64, 8, 3),
    ("fwd", True, True, None): (64, 32, 8, 2),
    ("fwd", True, False, None): (64, 32, 8, 2),
    ("dq", False, True, None): (64, 64, 4, 2),
    ("dq", False, False, None): (64, 64, 8, 2),
    ("dq", True, True, None): (32, 32, 8, 2),  # 64 queries: ptxas spills 8 bytes at 80 registers
    ("dq", True, False, None): (32, 32, 8, 2),
    ("dkdv", False, True, None): (64, 64, 4, 2),
    ("dkdv", False, False, None): (32, 128, 8, 2),
    ("dkdv", True, True, None): (32, 64, 8, 2),
    ("dkdv", True, False, None): (32, 32, 8, 1),
}


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _config(kind: str, dtype: torch.dtype, head_dim: int, dropout: bool) -> tuple[int, int, int, int]:
    key = (kind, dtype == torch.float32, _block_d(head_dim) <= 64)
    return _CONFIGS.get(key + (dropout,)) or _CONFIGS[key + (None,)]


# ----------------------------------------------------------------------------------------------------------
# launchers (the kernel-module interface)
# ----------------------------------------------------------------------------------------------------------


def unsupported(qkv: torch.Tensor, num_heads: int, scale: float, dropout_p: float, *, backend: str = "triton"):
    """Why these kernels cannot run this call (a sentence), or None when they can."""
    if qkv.dtype not in DTYPES:
        return f"triton attention supports float32, float16 and bfloat16, got {qkv.dtype}"
    head_dim = qkv.shape[2] // (3 * num_heads)
    if head_dim > MAX_HEAD_DIM:
        return f"triton attention supports head dim <= {MAX_HEAD_DIM}, got {head_dim}"
    if qkv.numel() == 0:
        return "triton attention needs a non-empty qkv"
    if qkv.stride(2) != 1:
        return "triton attention needs qkv's last dim contiguous"
    if triton.cdiv(qkv.shape[1], 32) > 65535:
        return f"triton attention needs N <= {65535 * 32} (grid axis 1), got {qkv.shape[1]}"
    if qkv.shape[0] * num_heads > 2**31 - 1:
        return f"triton attention needs batch * num_heads < 2**31, got {qkv.shape[0] * num_heads}"
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


def _seed_arg(seed: torch.Tensor, dropout_p: float, device: torch.device) -> torch.Tensor:
    if dropout_p > 0:
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"dropout needs an int64 seed tensor of one element, got {seed.dtype} {tuple(seed.shape)}")
        return seed
    return torch.zeros(1, dtype=torch.int64, device=device)  # never read (DROPOUT=False), but must be a pointer


def forward(qkv, num_heads, scale, dropout_p, seed, *, out=None, lse=None):
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
    BLOCK_M, BLOCK_N, num_warps, num_stages = _config("fwd", qkv.dtype, D, dropout_p > 0)
    grid = (B * H, triton.cdiv(N, BLOCK_M))
    _attn_fwd[grid](
        qkv, out, lse, _seed_arg(seed, dropout_p, qkv.device),
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        N, H, scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p),
        D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(D), DROPOUT=dropout_p > 0, UPCAST=_upcast(qkv),
        ALIGNED=_aligned(qkv, out, head_dim=D), num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def backward(grad_out, qkv, out, lse, num_heads, scale, dropout_p, seed, *, grad_qkv=None):
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
    seed = _seed_arg(seed, dropout_p, qkv.device)
    common = dict(D=D, BLOCK_D=_block_d(D), DROPOUT=dropout_p > 0, UPCAST=_upcast(qkv),
                  ALIGNED=_aligned(qkv, out, grad_out, grad_qkv, head_dim=D))
    keep_scale = 1.0 / (1.0 - dropout_p)

    BLOCK_M, BLOCK_N, num_warps, num_stages = _config("dq", qkv.dtype, D, dropout_p > 0)
    _attn_bwd_dq[(B * H, triton.cdiv(N, BLOCK_M))](
        qkv, out, grad_out, lse, delta, grad_qkv, seed,
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
        grad_qkv.stride(0), grad_qkv.stride(1),
        N, H, scale, dropout_p, keep_scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps, num_stages=num_stages, **common,
    )
    BLOCK_M, BLOCK_N, num_warps, num_stages = _config("dkdv", qkv.dtype, D, dropout_p > 0)
    _attn_bwd_dkdv[(B * H, triton.cdiv(N, BLOCK_N))](
        qkv, grad_out, lse, delta, grad_qkv, seed,
        qkv.stride(0), qkv.stride(1), grad_out.stride(0), grad_out.stride(1), grad_qkv.stride(0), grad_qkv.stride(1),
        N, H, scale, dropout_p, keep_scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps, num_stages=num_stages, **common,
    )
    return grad_qkv


def dropout_mask(seed: torch.Tensor, B: int, H: int, N: int, dropout_p: float, device) -> torch.Tensor:
    """The (B, H, N, N) bool keep mask the kernels draw for `seed` (int64, (1,)) and dropout_p: True = kept.
    Materialises N*N per head: for tests and small shapes only."""
    mask = torch.empty(B, H, N, N, dtype=torch.uint8, device=device)
    BLOCK = 32
    _dropout_mask_kernel[(B * H, triton.cdiv(N, BLOCK))](
        mask, seed.to(device=device, dtype=torch.int64), N, dropout_p, BLOCK_M=BLOCK, BLOCK_N=64
    )
    return mask.bool()


# ----------------------------------------------------------------------------------------------------------
# sm_90 compile checks (cct_kernels/triton/sm90.py): the launchers themselves, on meta tensors
# ----------------------------------------------------------------------------------------------------------


def _sm90_check(dtype: torch.dtype, head_dim: int, dropout: bool, backward_pass: bool, N: int = 256,
                B: int = 2, H: int = 4) -> dict:
    """forward() (or backward()) on meta tensors of (B, N, H, head_dim): sm90.py compiles what they launch."""
    p = 0.1 if dropout else 0.0

    def launch():
        qkv = torch.empty(B, N, 3 * H * head_dim, dtype=dtype, device="meta")
        seed = torch.empty(1, dtype=torch.int64, device="meta")
        if not backward_pass:
            forward(qkv, H, head_dim**-0.5, p, seed)
            return
        out = torch.empty(B, N, H * head_dim, dtype=dtype, device="meta")
        lse = torch.empty(B, H, N, dtype=torch.float32, device="meta")
        backward(torch.empty_like(out), qkv, out, lse, H, head_dim**-0.5, p, seed)

    name = f"{'bwd' if backward_pass else 'fwd'}_{str(dtype).split('.')[-1]}_d{head_dim}_N{N}{'_dropout' if dropout else ''}"
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
]

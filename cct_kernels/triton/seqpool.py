"""SeqPool in Triton: softmax over the sequence of x . weight + bias, then the weighted sum of x.

Shapes: x (B, N, D) contiguous, weight (1, D), bias (1,); float32, float16 or bfloat16 (all the same dtype),
accumulated in float32. Any B >= 0, N >= 1, D >= 1 (D above `MAX_BLOCK_D` is looped over in chunks).
Key padding: lengths None or (B,) int64 on x's device, 0 <= lengths[b] <= N (row b's real tokens are its first
lengths[b]): the softmax runs over real tokens only and the kernels loop over those only (padding is never loaded);
padded tokens get zero gradients; a row without real tokens gives out = 0 and lse = -inf. Without lengths the
kernels compile as before (HAS_LENGTHS).

Forward, one pass over x. B alone gives too few programs to fill a GPU (128 rows on 132 SMs), so N is split too:
program (b, s) runs an online softmax over its chunk of tokens, keeping a running max m, running sum l and a
running weighted sum acc (D floats), and writes them to a float32 workspace; a second small kernel combines the
chunks of each row (out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M), lse = M + log L); a chunk past a row's
real tokens leaves m = -inf, l = 0, acc = 0.

Backward, from the saved lse, one pass over x: per token s = x.w + b, p = exp(s - lse), ds = p (g.x - g.out),
dx = p g + ds w; each program writes its partial dw = sum ds x and db = sum ds to a workspace that torch sums
(deterministic: no atomics).

Floors on an H100 (3.35 TB/s) in bf16: forward reads x once (B*N*D*2 bytes): 5.0 us at B=128, N=256, D=256 and
2.9 us at B=64, N=196, D=384; backward reads x and writes dx (twice that). FLOPs are negligible (4 per element).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cct_kernels.triton._common import cdiv, next_power_of_2, sm_count
from cct_kernels.triton.key_padding import real_tokens

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK_D = 1024  # widest D chunk held in registers; wider rows are looped over in chunks
# Elements of x per loaded tile (BLOCK_N * BLOCK_D) with 8 warps: 16 (forward) or 8 (backward) per thread keeps
# registers low (48-64 on sm_90), so several programs share an SM and keep loads in flight.
FORWARD_TILE = 4096
BACKWARD_TILE = 2048


def auto_declines(x, weight, bias, lengths=None, *, backend="triton"):
    """"auto" leaves SeqPool to the cuda kernel (or eager): on the H200 (2026-11-30, B 128, N 256, D 256, bf16, CUDA
    graph replay) this forward took 46 µs against 17 µs for the cuda kernel and 15 µs for eager, and forward +
    backward 160 µs against 78 / 76 µs (benchmarks/NOTES.md, "First GPU run"). The kernels since keep one online
    softmax per token lane (no barrier left in their loops); until a GPU run measures them, auto keeps to what was
    measured. backend="triton" by name still runs them."""
    return "measured slower than the cuda kernel and eager on an H200 (46 vs 17 µs forward at B 128, N 256, D 256)"


def unsupported(x, weight, bias, lengths=None, *, backend="triton"):
    """Why the Triton kernels cannot serve these inputs, or None."""
    if lengths is not None and (lengths.dtype != torch.int64 or tuple(lengths.shape) != (x.shape[0],)):
        return f"triton seqpool takes lengths as a (B,) int64 tensor, got {lengths.dtype} {tuple(lengths.shape)}"
    if x.dtype not in DTYPES:
        return f"triton seqpool supports float32, float16 and bfloat16, got {x.dtype}"
    if not x.is_contiguous():
        return "triton seqpool needs a contiguous x"
    if x.numel() >= 2**31:
        return f"triton seqpool indexes x with int32 inside a row block; x has {x.numel()} elements (limit 2**31)"
    return None


# ---------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _forward_partial_kernel(
    x_ptr, w_ptr, b_ptr, lengths_ptr, m_ws, l_ws, acc_ws, N, D, CHUNK, SPLIT,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D_BLOCK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
):
    """Program (row, split): online softmax over the real tokens of [split*CHUNK, +CHUNK) of one row -> (m, l,
    acc[D]); none (a chunk past the real tokens) leaves m = -inf, l = 0, acc = 0."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    x_row = x_ptr + row.to(tl.int64) * N * D
    n_start = split * CHUNK
    n_end = tl.minimum(n_start + CHUNK, real_tokens(lengths_ptr, row, N, HAS_LENGTHS))
    ws = row * SPLIT + split
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    bias = tl.load(b_ptr).to(tl.float32)
    m = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    if ONE_D_BLOCK:
        # One online softmax per token lane (lane i sees tokens n0 + i): the loop's only reduction is each token's
        # dot with w, within a warp; the lanes are merged once at the end. Merging per block (max, sum and the
        # weighted sum over the block's tokens every step) put three cross-warp reductions, each through shared
        # memory behind a barrier, on every step's critical path: 46 µs at B 128, N 256, D 256 on an H200, 8x the
        # prediction (benchmarks/NOTES.md, "First GPU run").
        d_mask = offs_d < D
        w = tl.load(w_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        m_lane = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l_lane = tl.zeros([BLOCK_N], tl.float32)
        acc_lane = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for n0 in range(n_start, n_end, BLOCK_N):
            n = n0 + offs_n
            n_mask = n < n_end
            xt = tl.load(x_row + n[:, None] * D + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            xt = xt.to(tl.float32)
            s = tl.where(n_mask, tl.sum(xt * w[None, :], 1) + bias, float("-inf"))
            # NaN propagates (the GPU's max would return the other operand), as the reference's softmax does; a lane
            # with no token yet (m_new = -inf) keeps l = 0 and acc = 0 (exp(-inf - -inf) would be NaN)
            m_new = tl.maximum(m_lane, s, propagate_nan=tl.PropagateNan.ALL)
            alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m_lane - m_new))
            p = tl.where(m_new == float("-inf"), 0.0, tl.exp(s - m_new))
            l_lane = l_lane * alpha + p
            acc_lane = acc_lane * alpha[:, None] + p[:, None] * xt
            m_lane = m_new
        m = tl.max(m_lane, 0)
        scale = tl.where(m_lane == float("-inf"), 0.0, tl.exp(m_lane - m))
        l = tl.sum(l_lane * scale, 0)
        acc = tl.sum(acc_lane * scale[:, None], 0)
        tl.store(acc_ws + ws.to(tl.int64) * D + offs_d, acc, mask=d_mask)
    else:
        # Wide rows: the scores need the whole row before the weights are known, so each token block is read
        # twice, the second time from L1/L2; acc lives in the (zeroed) workspace row this program owns.
        acc_row = acc_ws + ws.to(tl.int64) * D
        # l kept per token lane and summed at the end: a scalar running sum across these nested loops is spilled
        # to local memory by ptxas on sm_90 (8 bytes per outer step).
        l_vec = tl.zeros([BLOCK_N], tl.float32)
        for n0 in range(n_start, n_end, BLOCK_N):
            n = n0 + offs_n
            n_mask = n < n_end
            s = tl.zeros([BLOCK_N], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                d_mask = d < D
                w = tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
                xt = tl.load(x_row + n[:, None] * D + d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                s += tl.sum(xt.to(tl.float32) * w[None, :], 1)
            s = tl.where(n_mask, s + bias, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new)
            l_vec = l_vec * alpha + p
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                d_mask = d < D
                xt = tl.load(x_row + n[:, None] * D + d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                acc = tl.load(acc_row + d, mask=d_mask, other=0.0)
                acc = acc * alpha + tl.sum(p[:, None] * xt.to(tl.float32), 0)
                tl.store(acc_row + d, acc, mask=d_mask)
            m = m_new
        l = tl.sum(l_vec, 0)
    tl.store(m_ws + ws, m)
    tl.store(l_ws + ws, l)


@triton.jit
def _forward_combine_kernel(
    m_ws, l_ws, acc_ws, out_ptr, lse_ptr, D, SPLIT,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LENGTHS: tl.constexpr,
):
    """Program (row, d block): merge the SPLIT partial softmaxes of one row into out[row, d block] and lse[row]."""
    row = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < SPLIT
    m = tl.load(m_ws + row * SPLIT + offs_s, mask=s_mask, other=float("-inf"))
    l = tl.load(l_ws + row * SPLIT + offs_s, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    if HAS_LENGTHS:
        # A row without real tokens: every partial is empty (m = -inf, l = 0, acc = 0); shift by 0 instead of
        # -inf (no NaN) and divide by 1: out = 0, lse = -inf + log 0 = -inf.
        m_ref = tl.where(m_max > float("-inf"), m_max, 0.0)
        scale = tl.where(s_mask, tl.exp(m - m_ref), 0.0)
        total = tl.sum(l * scale, 0)
        divisor = tl.where(total > 0, total, 1.0)
    else:
        scale = tl.where(s_mask, tl.exp(m - m_max), 0.0)
        total = tl.sum(l * scale, 0)
        divisor = total
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    acc = tl.load(
        acc_ws + (row * SPLIT + offs_s).to(tl.int64)[:, None] * D + d[None, :],
        mask=s_mask[:, None] & d_mask[None, :], other=0.0,
    )
    out = tl.sum(acc * scale[:, None], 0) / divisor
    tl.store(out_ptr + row.to(tl.int64) * D + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)
    if pid_d == 0:
        tl.store(lse_ptr + row, m_max + tl.log(total))


@triton.jit
def _backward_kernel(
    g_ptr, x_ptr, w_ptr, b_ptr, lengths_ptr, out_ptr, lse_ptr, dx_ptr, dw_ws, db_ws, N, D, CHUNK, SPLIT,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D_BLOCK: tl.constexpr, HAS_LENGTHS: tl.constexpr,
):
    """Program (row, split): dx for tokens [split*CHUNK, +CHUNK) of one row, and its partial dw (D) and db. Only
    the real tokens are loaded and computed; padded ones get dx = 0."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    row64 = row.to(tl.int64)
    x_row = x_ptr + row64 * N * D
    dx_row = dx_ptr + row64 * N * D
    n_start = split * CHUNK
    n_end = tl.minimum(n_start + CHUNK, N)
    real_end = tl.minimum(n_start + CHUNK, real_tokens(lengths_ptr, row, N, HAS_LENGTHS))  # n_end without lengths
    ws = row * SPLIT + split
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    bias = tl.load(b_ptr).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    db = tl.zeros([BLOCK_N], tl.float32)
    if ONE_D_BLOCK:
        d_mask = offs_d < D
        w = tl.load(w_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row64 * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        o = tl.load(out_ptr + row64 * D + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        g_out = tl.sum(g * o, 0)
        dw_lane = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # per token lane, summed once after the loop (see forward)
        for n0 in range(n_start, real_end, BLOCK_N):
            n = n0 + offs_n
            n_mask = n < real_end
            tile = n[:, None] * D + offs_d[None, :]
            mask = n_mask[:, None] & d_mask[None, :]
            xt = tl.load(x_row + tile, mask=mask, other=0.0).to(tl.float32)
            s = tl.sum(xt * w[None, :], 1) + bias
            p = tl.where(n_mask, tl.exp(s - lse), 0.0)
            ds = p * (tl.sum(xt * g[None, :], 1) - g_out)
            dx = p[:, None] * g[None, :] + ds[:, None] * w[None, :]
            tl.store(dx_row + tile, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw_lane += ds[:, None] * xt
            db += ds
        tl.store(dw_ws + ws.to(tl.int64) * D + offs_d, tl.sum(dw_lane, 0), mask=d_mask)
    else:
        # Wide rows: pass 1 over D chunks gives x.w and x.g per token, pass 2 (x from L1/L2) writes dx and adds to
        # the partial dw in the (zeroed) workspace row this program owns.
        dw_row = dw_ws + ws.to(tl.int64) * D
        g_out = tl.sum(tl.zeros([BLOCK_D], tl.float32), 0)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            g = tl.load(g_ptr + row64 * D + d, mask=d_mask, other=0.0).to(tl.float32)
            o = tl.load(out_ptr + row64 * D + d, mask=d_mask, other=0.0).to(tl.float32)
            g_out += tl.sum(g * o, 0)
        for n0 in range(n_start, real_end, BLOCK_N):
            n = n0 + offs_n
            n_mask = n < real_end
            s = tl.zeros([BLOCK_N], tl.float32)
            gx = tl.zeros([BLOCK_N], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                d_mask = d < D
                w = tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + row64 * D + d, mask=d_mask, other=0.0).to(tl.float32)
                xt = tl.load(x_row + n[:, None] * D + d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                xt = xt.to(tl.float32)
                s += tl.sum(xt * w[None, :], 1)
                gx += tl.sum(xt * g[None, :], 1)
            p = tl.where(n_mask, tl.exp(s + bias - lse), 0.0)
            ds = p * (gx - g_out)
            db += ds
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                d_mask = d < D
                w = tl.load(w_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + row64 * D + d, mask=d_mask, other=0.0).to(tl.float32)
                tile = n[:, None] * D + d[None, :]
                mask = n_mask[:, None] & d_mask[None, :]
                xt = tl.load(x_row + tile, mask=mask, other=0.0).to(tl.float32)
                dx = p[:, None] * g[None, :] + ds[:, None] * w[None, :]
                tl.store(dx_row + tile, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                dw = tl.load(dw_row + d, mask=d_mask, other=0.0) + tl.sum(ds[:, None] * xt, 0)
                tl.store(dw_row + d, dw, mask=d_mask)
    if HAS_LENGTHS:
        _store_zeros(dx_row, tl.maximum(real_end, n_start), n_end, D, BLOCK_N, BLOCK_D)
    tl.store(db_ws + ws, tl.sum(db, 0))


@triton.jit
def _store_zeros(dx_row, n_from, n_to, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx = 0 for tokens [n_from, n_to) of a row (padding: no softmax weight), without loading anything."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    zeros = tl.zeros([BLOCK_N, BLOCK_D], tl.float32).to(dx_row.dtype.element_ty)
    for n0 in range(n_from, n_to, BLOCK_N):
        n = n0 + offs_n
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            tl.store(dx_row + n[:, None] * D + d[None, :], zeros, mask=(n[:, None] < n_to) & (d[None, :] < D))


# ---------------------------------------------------------------------------------------------------- launchers


def _empty(*shape, device, dtype):
    """Every uninitialised buffer the launchers allocate (tests replace it to poison them with NaN)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _programs_wanted(device: torch.device) -> int:
    """About four programs per SM keep enough loads in flight; on the CPU interpreter a few splits suffice."""
    return 4 * (sm_count(device) or 1)


def _blocks(D: int, max_block_d: int, tile: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) for rows of D elements."""
    block_d = min(next_power_of_2(D), max_block_d)
    block_n = max(1, min(64, tile // block_d))
    num_warps = 8 if block_d * block_n >= 2048 else 4
    return block_n, block_d, num_warps


def _split(B: int, N: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(CHUNK, SPLIT): tokens per program (a multiple of block_n) and programs per row, so B*SPLIT fills the GPU."""
    blocks = cdiv(N, block_n)
    wanted = max(1, cdiv(_programs_wanted(device), max(B, 1)))
    chunk = cdiv(blocks, min(wanted, blocks)) * block_n
    return chunk, cdiv(N, chunk)


def _lengths_arg(lengths, x):
    """The lengths pointer: the lengths, or without them x (a placeholder the kernels never read)."""
    return x if lengths is None else lengths


def forward(x, weight, bias, lengths=None, *, max_block_d: int = MAX_BLOCK_D):
    """x (B, N, D), weight (1, D), bias (1,), lengths None or (B,) int64 -> (out (B, D) float32, lse (B,) float32;
    a row without real tokens: out 0, lse -inf)."""
    B, N, D = x.shape
    out = _empty(B, D, device=x.device, dtype=torch.float32)
    lse = _empty(B, device=x.device, dtype=torch.float32)
    if B == 0:
        return out, lse
    block_n, block_d, num_warps = _blocks(D, max_block_d, FORWARD_TILE)
    chunk, split = _split(B, N, block_n, x.device)
    one_d_block = block_d >= D
    m_ws = _empty(B * split, device=x.device, dtype=torch.float32)
    l_ws = _empty(B * split, device=x.device, dtype=torch.float32)
    alloc = _empty if one_d_block else torch.zeros  # the chunked path accumulates into its workspace row
    acc_ws = alloc(B * split, D, device=x.device, dtype=torch.float32)
    _forward_partial_kernel[(B, split)](
        x, weight, bias, _lengths_arg(lengths, x), m_ws, l_ws, acc_ws, N, D, chunk, split,
        BLOCK_N=block_n, BLOCK_D=block_d, ONE_D_BLOCK=one_d_block, HAS_LENGTHS=lengths is not None,
        num_warps=num_warps,
    )
    block_s = next_power_of_2(split)
    combine_d = max(16, min(next_power_of_2(D), 4096 // block_s))
    _forward_combine_kernel[(B, cdiv(D, combine_d))](
        m_ws, l_ws, acc_ws, out, lse, D, split, BLOCK_S=block_s, BLOCK_D=combine_d, HAS_LENGTHS=lengths is not None,
        num_warps=4,
    )
    return out, lse


def backward(grad_out, x, weight, bias, out, lse, lengths=None, *, max_block_d: int = MAX_BLOCK_D):
    """-> (grad_x (B, N, D) x.dtype, grad_weight (1, D), grad_bias (1,)); grad_out (B, D) contiguous; out (float32)
    and lengths those of the forward."""
    B, N, D = x.shape
    grad_x = _empty(B, N, D, device=x.device, dtype=x.dtype)
    if B == 0:
        return grad_x, torch.zeros_like(weight), torch.zeros_like(bias)
    block_n, block_d, num_warps = _blocks(D, max_block_d, BACKWARD_TILE)
    chunk, split = _split(B, N, block_n, x.device)
    one_d_block = block_d >= D
    alloc = _empty if one_d_block else torch.zeros
    dw_ws = alloc(B * split, D, device=x.device, dtype=torch.float32)
    db_ws = _empty(B * split, device=x.device, dtype=torch.float32)
    _backward_kernel[(B, split)](
        grad_out.contiguous(), x, weight, bias, _lengths_arg(lengths, x), out, lse, grad_x, dw_ws, db_ws, N, D, chunk,
        split, BLOCK_N=block_n, BLOCK_D=block_d, ONE_D_BLOCK=one_d_block, HAS_LENGTHS=lengths is not None,
        num_warps=num_warps,
    )
    # Each row's ds sums to delta = g.(out_exact - out), 0 up to float32 rounding; the exactly centred ds give
    # dw - delta out and db = 0 (softmax is shift-invariant), written delta - delta so that a NaN row still gives
    # NaN, as the reference does.
    delta = db_ws.view(B, split).sum(1, keepdim=True)
    grad_weight = (dw_ws.sum(0) - (delta * out).sum(0)).unsqueeze(0).to(weight.dtype)
    grad_bias = (delta - delta).sum(0).to(bias.dtype)
    return grad_x, grad_weight, grad_bias


# ------------------------------------------------------------------------------------------- sm_90 compile checks


def _sm90_check(dtype: torch.dtype, B: int, N: int, D: int, padded: bool = False) -> dict:
    """forward() then backward() on meta tensors, with key-padding lengths if `padded`: sm90.py compiles the
    kernels they launch."""

    def launch():
        x = torch.empty(B, N, D, dtype=dtype, device="meta")
        weight = torch.empty(1, D, dtype=dtype, device="meta")
        bias = torch.empty(1, dtype=dtype, device="meta")
        lengths = torch.empty(B, dtype=torch.int64, device="meta") if padded else None
        out, lse = forward(x, weight, bias, lengths)
        backward(torch.empty_like(out), x, weight, bias, out, lse, lengths)

    return {"name": f"{str(dtype).split('.')[-1]}_B{B}_N{N}_D{D}{'_lengths' if padded else ''}", "launch": launch}


# The benchmark shapes (CCT-7/32: N=256, D=256; CCT-14/224: N=196, D=384), an odd D, a D wider than one block, and
# a text model's padded batch.
SM90_CHECKS = [
    _sm90_check(torch.bfloat16, 128, 256, 256),
    _sm90_check(torch.bfloat16, 64, 196, 384),
    _sm90_check(torch.float16, 8, 197, 96),
    _sm90_check(torch.float32, 4, 64, 4096),
    _sm90_check(torch.bfloat16, 128, 64, 256, padded=True),  # text_cct_6: width 256, seq_len 64, key padding
]

"""The LayerNorms of ops.linear in Triton: the input_norm prologue's rows, and the backward of both LayerNorms (the
input_norm prologue and the norm epilogue).

    layer_norm_rows(x (M, N), weight (N,), bias (N,) or None, eps) -> (normalised (M, N) x.dtype, stats (2, M) float32)
    normalise_rows(x (M, N), stats (2, M) float32, weight, bias) -> normalised (M, N): the same rows again
    layer_norm_backward(grad (M, N), normalised (M, N), stats (2, M) float32, weight (N,), has_bias)
        -> (grad_input (M, N) grad.dtype, grad_weight (N,) weight.dtype, grad_bias (N,) or an empty (0,) tensor)

Rows: normalised = (x - mean) * rstd * weight + bias in float32, rounded once to x's dtype (as F.layer_norm's output
is); stats holds each row's mean and rstd = 1 / sqrt(var + eps), two passes over the row held in registers.
normalise_rows remakes the forward's normalised rows from its stats, with the same instructions, so the values are
the same to the bit (the backward's grad_W input, recomputed rather than kept).
Why a kernel of its own ahead of the GEMM rather than the GEMM's prologue: on the H200 (2026-11-30, bf16 CCT-7
training step at batch 128, M = 32768) qkv with pre_norm normalised in its A-tile loads took 122 µs a forward and 121
µs a grad_W, against 40 / 50 µs for linear1's kernels (GELU fused) with 2/3 of the FLOPs. The likely causes, from
the sm_90 SASS: the normalised tile must pass through registers, so the loads feeding wgmma lose their cp.async
pipeline (342 instructions a loop step against 82), and each of the 6 column programs of a row block took the rows'
statistics again. A row pass costs a read and a write of x (predicted ~10 µs there).

Backward: `normalised` holds the rows the LayerNorm normalised (x for input_norm, the residual sum for norm),
`stats` their mean and 1 / std from the forward. With xhat = (x - mean) * rstd and gw = grad * weight, per row:
    grad_input = rstd * (gw - mean(gw * xhat) * xhat - mean(gw)),
and over rows grad_weight = sum(grad * xhat), grad_bias = sum(grad), all in float32.
One kernel, no atomics (deterministic): each program walks a contiguous chunk of rows, BLOCK_M whole rows at a time
(BLOCK_N >= N columns), writes their grad_input and keeps float32 column sums of grad * xhat and grad, stored as
one partial row per program; torch sums the partials. This replaces ATen's native_layer_norm_backward in the eager
backward of the triton backend: on the H200 ATen's kernels took 2.4 ms of the step's 10.5 ms of GPU time (its
gamma/beta kernel 127 µs a call at M = 32768, N = 256, for 32 MB of reads), where this kernel reads grad and x once
(16 MB each there) and writes grad_input once.
Rows of any width N <= MAX_COLUMNS; M * N < 2**31 (layer_norm_backward_reason; layer_norm_rows raises ValueError
with the same sentence).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cct_kernels.triton._common import cdiv, next_power_of_2
from cct_kernels.triton.linear_tiles import programs_wanted

MAX_COLUMNS = 8192
_TILE_ELEMENTS = 4096  # BLOCK_M * BLOCK_N per step: 16 KB of float32 per operand tile across 4 warps


@triton.jit
def _layer_norm_rows_kernel(x_ptr, w_ptr, b_ptr, stats_ptr, out_ptr, M, N, eps, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, GIVEN_STATS: tl.constexpr):
    """BLOCK_M whole rows of x normalised; their mean and rstd taken (stored to stats_ptr) or, GIVEN_STATS, read."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GIVEN_STATS:
        mean = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(stats_ptr + M + rows, mask=row_ok, other=0.0)
    else:
        mean = tl.sum(x, 1) / N
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(centred * centred, 1) / N + eps)
        tl.store(stats_ptr + rows, mean, mask=row_ok)
        tl.store(stats_ptr + M + rows, rstd, mask=row_ok)
    out = (x - mean[:, None]) * rstd[:, None] * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_backward_kernel(g_ptr, x_ptr, stats_ptr, w_ptr, gx_ptr, gw_part_ptr, gb_part_ptr, M, N,
                                ROWS_PER_PROGRAM, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                HAS_BIAS: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    # column sums kept per row lane and reduced once after the loop: a reduction across the tile's rows every step
    # is a cross-warp one, through shared memory behind barriers (as in seqpool.py's forward)
    gw_lane = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    gb_lane = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first = pid * ROWS_PER_PROGRAM
    last = tl.minimum(first + ROWS_PER_PROGRAM, M)
    for row0 in range(first, last, BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * N + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(stats_ptr + M + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        gw = g * w[None, :]
        c1 = tl.sum(gw * xhat, 1) / N
        c2 = tl.sum(gw, 1) / N
        gx = (gw - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        gw_lane += g * xhat
        if HAS_BIAS:
            gb_lane += g
    tl.store(gw_part_ptr + pid * N + cols, tl.sum(gw_lane, 0), mask=col_ok)
    if HAS_BIAS:
        tl.store(gb_part_ptr + pid * N + cols, tl.sum(gb_lane, 0), mask=col_ok)


def _whole_rows(M: int, N: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of a tile of whole rows; ValueError when these kernels cannot take (M, N) rows."""
    reason = layer_norm_backward_reason(M, N)
    if reason is not None:
        raise ValueError(reason)
    block_n = max(16, next_power_of_2(N))
    return max(1, min(16, _TILE_ELEMENTS // block_n)), block_n


def _rows(x, weight, bias, eps, stats):
    M, N = x.shape
    block_m, block_n = _whole_rows(M, N)
    out = torch.empty_like(x)
    given = stats is not None
    if not given:
        stats = torch.empty(2, M, device=x.device, dtype=torch.float32)
    if M:
        _layer_norm_rows_kernel[(cdiv(M, block_m),)](
            x, weight, x if bias is None else bias, stats, out, M, N, eps, BLOCK_M=block_m, BLOCK_N=block_n,
            HAS_BIAS=bias is not None, GIVEN_STATS=given, num_warps=4,
        )
    return out, stats


def layer_norm_rows(x, weight, bias, eps):
    """See the module docstring; x, weight and bias contiguous, of one dtype, on one device."""
    return _rows(x, weight, bias, eps, None)


def normalise_rows(x, stats, weight, bias):
    """layer_norm_rows' normalised rows again, from its stats (see the module docstring)."""
    return _rows(x, weight, bias, 0.0, stats)[0]


def layer_norm_backward_reason(M: int, N: int) -> str | None:
    """Why these kernels cannot take (M, N) rows, or None."""
    if N > MAX_COLUMNS:
        return f"the Triton LayerNorm kernels hold whole rows: N = {N} > {MAX_COLUMNS}"
    if M * N >= 2**31:
        return f"M * N = {M * N} >= 2**31 (int32 offsets)"
    return None


def layer_norm_backward(grad, normalised, stats, weight, has_bias):
    """See the module docstring; every tensor contiguous, grad and normalised of one dtype, on one device."""
    M, N = grad.shape
    block_m, block_n = _whole_rows(M, N)
    grad_input = torch.empty_like(grad)
    programs = max(1, min(cdiv(M, block_m), 4 * programs_wanted(grad.device)))
    rows_per_program = cdiv(cdiv(M, programs), block_m) * block_m if M else block_m
    programs = max(1, cdiv(M, rows_per_program))
    parts = torch.empty(2 if has_bias else 1, programs, N, device=grad.device, dtype=torch.float32)
    _layer_norm_backward_kernel[(programs,)](
        grad, normalised, stats, weight, grad_input, parts[0], parts[-1], M, N, rows_per_program,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=has_bias, num_warps=4,
    )
    sums = parts.sum(1).to(weight.dtype)
    return grad_input, sums[0], sums[1] if has_bias else weight.new_empty(0)

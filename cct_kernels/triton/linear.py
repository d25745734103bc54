"""Linear with its prologue and epilogue fused, in Triton:
    out = norm(dropout(activation(input_norm(x) @ weight.T + bias)) * row_scale + residual), forward and backward.

Kernel-module interface of cct_kernels.backends for the op cct_kernels.ops.linear (see ops/linear.py for the
arguments and outputs of forward and backward): unsupported(x, weight, bias, residual, activation, norm_weight,
input_norm_weight, *, backend) -> str | None; forward(...) -> (out, saved, stats, input_stats); backward(...) ->
(grad at the GEMM's input, grad_weight, grad_bias).
Every tensor contiguous and of one dtype (float32, float16, bfloat16); outputs in that dtype. Any M >= 0,
N, K >= 1 (every tile is masked at the tails); M*K, M*N and N*K below 2**31 (int32 offsets), else unsupported()
says so.

Forward: one tiled GEMM (tl.dot, float32 accumulation; wgmma on sm_90 for 16-bit inputs), 1-D grid in grouped
order (GROUP_M row blocks walk the column blocks together, so their x rows and W stay in L2), epilogue on the
float32 accumulator: + bias, the value h stored when the backward needs it (GELU with save_for_backward), the
erf GELU h * Phi(h), dropout (the mask hashed per tile: linear_math.py), * row_scale, + residual, one rounding to
the output dtype; with norm (norm1) a tile spans whole rows and is normalised in registers. input_norm (pre_norm)
is a row pass of its own ahead of the GEMM (linear_norm.layer_norm_rows: the normalised rows and their mean and
1 / std): normalising the GEMM's x tiles as they loaded measured slow on the H200 (see linear_norm.py).
Backward (the kernels' path): grad_h = GELU'(h) * mask / (1 - p) * row_scale * grad_out (h the saved
pre-activation, in the input dtype, as the reference's gelu_backward sees it; the mask rehashed) is computed in the
prologue of both GEMMs from the grad_out and h tiles they load, so no grad_h tensor is written (with input_norm,
grad_W's x is the forward's normalised rows, remade from its statistics by linear_norm.normalise_rows); it is
rounded to the input dtype before each tensor-core product, as the reference's grad_h tensor is. Two kernels, no
atomics (deterministic):
    grad_x (M, K) = grad_h @ W: programs over (M, K) tiles, reducing over N.
    grad_W (N, K) = grad_h^T @ x, computed as (K, N) tiles of x^T @ grad_h: N*K holds few tiles (12 at N=768,
        K=256), so M is split into SPLIT chunks and each program (chunk, N tile, K tile) writes a float32 partial
        that torch sums over the chunks; the same programs sum grad_h's columns over their chunk for grad_b
        (stored by the K-tile-0 programs). SPLIT = 1 stores straight into the outputs.
Precision: float32 accumulation throughout; 16-bit inputs feed the tensor cores directly. float32 inputs follow
torch.backends.cuda.matmul.allow_tf32, read at each call (as cct_kernels/triton/attention.py): True -> TF32
tensor cores (like torch.matmul under the same flag), False (torch's default) -> exact fp32 products ('ieee').
Phi: float32 outputs use libdevice's erf (the exact GELU of F.gelu to float32 rounding); 16-bit outputs and the
backward's GELU' use one erfc polynomial (Abramowitz-Stegun 7.1.26, |error| <= 1.5e-7 on erf: at most 7.5e-8 |h|
in the GELU, far below a 16-bit rounding, and 3.0e-7 in GELU', against 1.4e-7 for float32 libdevice erf), which
costs half the instructions; see linear_math._normal_tail.
On a GPU (CUDA tensors, _vendor_gemm; not under torch.use_deterministic_algorithms) two things go to cuBLAS instead:
    a forward with nothing to fuse (no GELU, dropout, row scale, residual or norm; the bias is cuBLASLt's own
        epilogue): F.linear. In the encoder block that is qkv, behind pre_norm's row pass.
    every backward: grad_h in one Triton pass where there is a prologue (_grad_h_kernel: GELU', dropout's mask, the
        row scale, rounded as above; grad_out itself otherwise), then grad_x = grad_h @ W and grad_W = grad_h^T @ x
        on cuBLAS and grad_b as grad_h's float32 column sums.
Why: on the H200 (2026-11-30, CCT-7 training at batch 128, M = 32768) cuBLAS ran that step's linears at 17-20 µs a
GEMM where these kernels took 40-60 µs at the same shapes: 103 µs for linear1's fused backward, 90 µs for
linear2's, against ~75 / ~50 µs predicted for the pass and two cuBLAS GEMMs (benchmarks/NOTES.md, "Second look at
the H200 trace"). The forward keeps its fused epilogues (~equal either way by the same estimate, one pass less).
Under TRITON_INTERPRET (CPU tensors) the kernels serve every call, so tests cover them; tune_linear.py sweeps them
against cuBLAS on a GPU.
Configs: no autotuning (the interpreter cannot autotune); linear_tiles.config picks tiles from the dtype and the
shapes, chosen from the sm_90 static figures (see _sm90_check and benchmarks/NOTES.md).
Under TRITON_INTERPRET=1 (CPU tensors, tests only) bfloat16 values are upcast to float32 after loading, since the
interpreter computes bfloat16 arithmetic wrongly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cct_kernels import reference
from cct_kernels.triton._common import cdiv, dot_precision, next_power_of_2, tf32_matmul, upcast_bfloat16
from cct_kernels.triton.linear_math import gelu_erf, gelu_erf_grad, kept, load_tile, seed_key
from cct_kernels.triton.linear_norm import (  # noqa: F401 (layer_norm_backward*: the interface's LayerNorms' backward)
    MAX_COLUMNS, layer_norm_backward, layer_norm_backward_reason, layer_norm_rows, normalise_rows,
)
from cct_kernels.triton.linear_tiles import MIN_CHUNK_ROWS, config, split_rows

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GROUP_M = 8  # row blocks per group of the swizzled program order
MAX_NORM_COLUMNS = 1024  # the LayerNorm epilogue holds whole rows in one tile


def unsupported(x, weight, bias, residual, activation, norm_weight=None, input_norm_weight=None, *,
                backend: str = "triton") -> str | None:
    """Why these kernels cannot serve the call (a sentence), or None."""
    if x.dtype not in DTYPES:
        return f"triton linear supports float32, float16 and bfloat16, got {x.dtype}"
    if not all(t.is_contiguous() for t in (x, weight, bias, residual) if t is not None):
        return "triton linear needs contiguous x, weight, bias and residual"
    M, K = x.shape
    N = weight.shape[0]
    if max(M * K, M * N, N * K) >= 2**31:
        return f"triton linear indexes with int32: M*K, M*N and N*K must be < 2**31 (M={M}, N={N}, K={K})"
    if norm_weight is not None and N > MAX_NORM_COLUMNS:
        return f"triton linear's LayerNorm epilogue holds whole rows: N must be <= {MAX_NORM_COLUMNS}, got {N}"
    if input_norm_weight is not None and K > MAX_COLUMNS:
        return f"triton linear's input LayerNorm holds whole rows: K must be <= {MAX_COLUMNS}, got {K}"
    return None


# ---------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _grouped(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(tile row, tile column) of program pid: GROUP_M tile rows walk the tile columns together."""
    width = GROUP_M * tiles_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _grad_h(g_ptr, h_ptr, scale_ptr, offs, rows, cols, mask, key0, threshold, inv_keep, EVEN: tl.constexpr,
            GELU: tl.constexpr, HAS_SCALE: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr):
    """The tile of grad_h = GELU'(h) * mask / (1 - p) * row_scale * grad_out at offs (element (rows[i], cols[j]);
    rows already inside [0, M)), rounded to the input dtype (float32 when UPCAST)."""
    g = load_tile(g_ptr + offs, mask, EVEN, UPCAST)
    if GELU or HAS_SCALE or DROPOUT:
        g32 = g.to(tl.float32)
        if HAS_SCALE:
            g32 *= tl.load(scale_ptr + rows).to(tl.float32)[:, None]
        if DROPOUT:
            g32 = tl.where(kept(key0, rows, cols, threshold), g32 * inv_keep, 0.0)
        if GELU:
            g32 *= gelu_erf_grad(load_tile(h_ptr + offs, mask, EVEN, UPCAST).to(tl.float32))
        g = g32.to(g.dtype)
    return g


@triton.jit
def _grad_h_kernel(g_ptr, h_ptr, scale_ptr, seed_ptr, out_ptr, M, N, threshold, inv_keep, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, GELU: tl.constexpr, HAS_SCALE: tl.constexpr, DROPOUT: tl.constexpr,
                   UPCAST: tl.constexpr):
    """One program: a (BLOCK_M, BLOCK_N) tile of grad_h (_grad_h) stored to out_ptr, for the vendor GEMMs."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows[:, None] * N + cols[None, :]
    key0 = seed_key(seed_ptr) if DROPOUT else 0
    grad_h = _grad_h(g_ptr, h_ptr, scale_ptr, offs, rows % M, cols, mask, key0, threshold, inv_keep, False, GELU,
                     HAS_SCALE, DROPOUT, UPCAST)
    tl.store(out_ptr + offs, grad_h.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, b_ptr, res_ptr, scale_ptr, out_ptr, h_ptr, seed_ptr, nw_ptr, nb_ptr, stats_ptr, M, N, K,
    threshold, inv_keep, norm_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr,
    GELU: tl.constexpr, DROPOUT: tl.constexpr, NORM: tl.constexpr, NORM_BIAS: tl.constexpr, SAVE_H: tl.constexpr,
    SAVE_SUM: tl.constexpr, EXACT_ERF: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: the (BLOCK_M, BLOCK_N) tile of out (and of h when SAVE_H). With NORM the tile holds whole rows
    (BLOCK_N >= N): the sum is normalised in registers, written to h_ptr when SAVE_SUM, its row mean and 1 / std to
    stats_ptr (2, M)."""
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Tail rows/columns load row 0.. again (wrapped) instead of masking; their results are never stored.
    x_ptrs = x_ptr + (rows % M)[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + (cols % N)[:, None] * K + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k[None, :] < K - k0
        a = load_tile(x_ptrs, k_ok, EVEN_K, UPCAST)
        w = load_tile(w_ptrs, k_ok, EVEN_K, UPCAST)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    offs = rows[:, None] * N + cols[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SAVE_H:
        tl.store(h_ptr + offs, acc.to(h_ptr.dtype.element_ty), mask=mask)
    if GELU:
        acc = gelu_erf(acc, EXACT_ERF)
    if DROPOUT:
        acc = tl.where(kept(seed_key(seed_ptr), rows, cols, threshold), acc * inv_keep, 0.0)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rows, mask=rows < M, other=0.0).to(tl.float32)[:, None]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # the sum as the reference's tensor rounds it
        if SAVE_SUM:
            tl.store(h_ptr + offs, acc.to(h_ptr.dtype.element_ty), mask=mask)
        acc = tl.where(col_ok[None, :], acc, 0.0)  # in place: one tile of registers live (no spills at N = 384)
        mean = tl.sum(acc, 1) / N
        acc = tl.where(col_ok[None, :], acc - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(acc * acc, 1) / N + norm_eps)
        acc = acc * rstd[:, None] * tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if NORM_BIAS:
            acc += tl.load(nb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(stats_ptr + rows, mean, mask=rows < M)
        tl.store(stats_ptr + M + rows, rstd, mask=rows < M)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_x_kernel(
    g_ptr, h_ptr, w_ptr, gx_ptr, scale_ptr, seed_ptr, M, N, K, threshold, inv_keep,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_N: tl.constexpr, GELU: tl.constexpr, HAS_SCALE: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: the (BLOCK_M, BLOCK_K) tile of grad_x = grad_h @ W, reducing over N in BLOCK_N steps."""
    pid_m, pid_k = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    g_offs = (rows % M)[:, None] * N + offs_n[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * K + (cols % K)[None, :]
    key0 = seed_key(seed_ptr) if DROPOUT else 0
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_ok = offs_n < N - n0
        grad_h = _grad_h(g_ptr, h_ptr, scale_ptr, g_offs, rows % M, n0 + offs_n, n_ok[None, :], key0, threshold,
                         inv_keep, EVEN_N, GELU, HAS_SCALE, DROPOUT, UPCAST)
        w = load_tile(w_ptrs, n_ok[:, None], EVEN_N, UPCAST)
        acc = tl.dot(grad_h, w, acc, input_precision=PRECISION)
        g_offs += BLOCK_N
        w_ptrs += BLOCK_N * K
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    tl.store(gx_ptr + rows[:, None] * K + cols[None, :], acc.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_w_kernel(
    g_ptr, h_ptr, x_ptr, gw_ptr, gb_ptr, scale_ptr, seed_ptr, M, N, K, CHUNK, threshold, inv_keep,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    EVEN_M: tl.constexpr, GELU: tl.constexpr, HAS_SCALE: tl.constexpr, DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program (chunk, N tile, K tile): the chunk's partial of grad_W = grad_h^T @ x over rows
    [chunk*CHUNK, +CHUNK) into gw_ptr[chunk] (N, K), and with HAS_BIAS, on the K-tile-0 programs, the chunk's
    column sums of grad_h into gb_ptr[chunk] (N,). CHUNK is a multiple of BLOCK_M. Programs of one chunk are
    adjacent, so its grad_out, h and x rows stay in L2.
    The tile is computed transposed, grad_W^T = x^T @ grad_h, so that grad_h, made in registers, is the plain
    B operand of the MMA and db sums it in the same layout (grad_h^T as the A operand made Triton compute grad_h
    twice, once per layout); x^T is a transposed view of the x tile in shared memory, which wgmma reads as is."""
    tiles_k = tl.cdiv(K, BLOCK_K)
    tiles = tl.cdiv(N, BLOCK_N) * tiles_k
    pid = tl.program_id(0)
    chunk = pid // tiles
    pid_n = (pid % tiles) // tiles_k
    pid_k = pid % tiles_k
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    m_start = chunk * CHUNK
    m_end = tl.minimum(m_start + CHUNK, M)
    g_offs = (m_start + offs_m)[:, None] * N + (cols_n % N)[None, :]
    x_ptrs = x_ptr + (m_start + offs_m)[:, None] * K + (cols_k % K)[None, :]
    key0 = seed_key(seed_ptr) if DROPOUT else 0
    acc = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # summed over rows after the loop: no shuffles per step
    for m0 in range(m_start, m_end, BLOCK_M):
        m_ok = (offs_m < m_end - m0)[:, None]
        grad_h = _grad_h(g_ptr, h_ptr, scale_ptr, g_offs, (m0 + offs_m) % M, cols_n % N, m_ok, key0, threshold,
                         inv_keep, EVEN_M, GELU, HAS_SCALE, DROPOUT, UPCAST)
        a = load_tile(x_ptrs, m_ok, EVEN_M, UPCAST)
        if HAS_BIAS:
            db += grad_h.to(tl.float32)
        acc = tl.dot(tl.trans(a), grad_h, acc, input_precision=PRECISION)
        g_offs += BLOCK_M * N
        x_ptrs += BLOCK_M * K
    n_ok = cols_n < N
    gw_offs = chunk * N * K + cols_n[None, :] * K + cols_k[:, None]
    tl.store(gw_ptr + gw_offs, acc.to(gw_ptr.dtype.element_ty), mask=n_ok[None, :] & (cols_k < K)[:, None])
    if HAS_BIAS:
        db = tl.sum(db, 0)
        tl.store(gb_ptr + chunk * N + cols_n, db.to(gb_ptr.dtype.element_ty), mask=n_ok & (pid_k == 0))


# ---------------------------------------------------------------------------------------------------- launchers


def _empty(*shape, device, dtype):
    """Every uninitialised buffer the launchers allocate (tests replace it to poison them with NaN)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _vendor_gemm(x: torch.Tensor) -> bool:
    """Whether the call's GEMMs go to cuBLAS (see the module docstring): on CUDA tensors, unless
    torch.use_deterministic_algorithms is on (torch's cuBLAS calls then need CUBLAS_WORKSPACE_CONFIG set, or raise;
    these kernels are deterministic by construction)."""
    return x.is_cuda and not torch.are_deterministic_algorithms_enabled()


def _dropout_args(dropout_p: float, seed, placeholder) -> tuple:
    """(seed pointer, threshold, 1 / (1 - p)) kernel arguments; the placeholder pointer without dropout."""
    if dropout_p == 0:
        return placeholder, 0, 1.0
    if seed is None or seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError("linear dropout needs an int64 seed tensor of one element")
    return seed, reference.dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0


def forward(x, weight, bias, residual, activation, save_for_backward, row_scale=None, dropout_p=0.0, seed=None,
            norm_weight=None, norm_bias=None, norm_eps=1e-5, input_norm_weight=None, input_norm_bias=None,
            input_norm_eps=1e-5):
    """-> (out (M, N); saved (M, N) with save_for_backward: GELU's input h or the sum the LayerNorm normalised, else
    empty (0,); stats, input_stats (2, M) float32 with the output / input LayerNorm: mean and 1 / std per row, else
    empty (0,)). out and saved in x.dtype."""
    M, K = x.shape
    N = weight.shape[0]
    gelu, norm = activation == "gelu", norm_weight is not None
    save = save_for_backward and (gelu or norm)
    saved = _empty(M, N, device=x.device, dtype=x.dtype) if save else x.new_empty(0)
    stats = _empty(2, M, device=x.device, dtype=torch.float32) if norm else x.new_empty(0, dtype=torch.float32)
    input_stats = x.new_empty(0, dtype=torch.float32)
    if input_norm_weight is not None:
        x, input_stats = layer_norm_rows(x, input_norm_weight, input_norm_bias, input_norm_eps)
    if not (gelu or norm or residual is not None or row_scale is not None or dropout_p > 0) and _vendor_gemm(x):
        return F.linear(x, weight, bias), saved, stats, input_stats
    out = _empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0:
        return out, saved, stats, input_stats
    block_m, block_n, block_k, num_warps, num_stages = config("forward_norm" if norm else "forward", x.dtype, M, N, K)
    seed_ptr, threshold, inv_keep = _dropout_args(dropout_p, seed, out)
    _forward_kernel[(cdiv(M, block_m) * cdiv(N, block_n),)](
        x, weight, x if bias is None else bias, out if residual is None else residual,
        out if row_scale is None else row_scale, out, saved if save else out, seed_ptr,
        out if norm_weight is None else norm_weight, out if norm_bias is None else norm_bias,
        stats if norm else out, M, N, K, threshold, inv_keep, norm_eps,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M, EVEN_K=K % block_k == 0,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, HAS_SCALE=row_scale is not None,
        GELU=gelu, DROPOUT=dropout_p > 0, NORM=norm, NORM_BIAS=norm_bias is not None, SAVE_H=save and gelu,
        SAVE_SUM=save and norm, EXACT_ERF=x.dtype == torch.float32, UPCAST=upcast_bfloat16(x.dtype),
        PRECISION=dot_precision(x.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out, saved, stats, input_stats


def _grad_h_rows(grad_out, pre_activation, gelu: bool, row_scale, dropout_p: float, seed):
    """grad_h (M, N) in grad_out's dtype for the vendor GEMMs: grad_out itself with no prologue, else one pass of
    _grad_h_kernel (GELU', dropout's mask, the row scale), rounded as the fused kernels round it."""
    if not (gelu or row_scale is not None or dropout_p > 0):
        return grad_out
    M, N = grad_out.shape
    grad_h = _empty(M, N, device=grad_out.device, dtype=grad_out.dtype)
    if M:
        seed_ptr, threshold, inv_keep = _dropout_args(dropout_p, seed, grad_out)
        block_n = min(128, max(16, next_power_of_2(N)))
        _grad_h_kernel[(cdiv(M, 32), cdiv(N, block_n))](
            grad_out, pre_activation if gelu else grad_out, grad_out if row_scale is None else row_scale, seed_ptr,
            grad_h, M, N, threshold, inv_keep, BLOCK_M=32, BLOCK_N=block_n, GELU=gelu,
            HAS_SCALE=row_scale is not None, DROPOUT=dropout_p > 0, UPCAST=upcast_bfloat16(grad_out.dtype),
            num_warps=4,
        )
    return grad_h


def backward(grad_out, x, weight, has_bias, pre_activation, activation, row_scale=None, dropout_p=0.0, seed=None,
             input_norm_weight=None, input_norm_bias=None, input_stats=None, *, min_chunk: int = MIN_CHUNK_ROWS):
    """-> (grad at the GEMM's input (M, K), grad_weight (N, K), grad_bias (N,) or empty (0,) without bias), all in
    x.dtype. pre_activation: forward's saved h (M, N) when activation == "gelu" (unused otherwise); row_scale,
    dropout_p, seed, the input LayerNorm's weight and bias and input_stats: the forward's (grad_W's x is the
    forward's normalised rows again). min_chunk: the fewest rows of M per grad_W program (tests lower it to reach the
    split path on small shapes)."""
    M, K = x.shape
    N = weight.shape[0]
    dtype, device = x.dtype, x.device
    gelu = activation == "gelu"
    if input_norm_weight is not None:
        x = normalise_rows(x, input_stats, input_norm_weight, input_norm_bias)
    if _vendor_gemm(x):
        grad_h = _grad_h_rows(grad_out, pre_activation, gelu, row_scale, dropout_p, seed)
        return reference.linear_grads(grad_h, x, weight, has_bias)
    grad_x = _empty(M, K, device=device, dtype=dtype)
    if M == 0:
        return grad_x, torch.zeros_like(weight), weight.new_zeros(N if has_bias else 0)
    h = pre_activation if gelu else grad_out  # grad_out: a placeholder the kernels never read
    seed_ptr, threshold, inv_keep = _dropout_args(dropout_p, seed, grad_out)
    scale = grad_out if row_scale is None else row_scale
    common = dict(GELU=gelu, HAS_SCALE=row_scale is not None, DROPOUT=dropout_p > 0, UPCAST=upcast_bfloat16(dtype),
                  PRECISION=dot_precision(dtype))

    block_m, block_k, block_n, num_warps, num_stages = config("grad_x", dtype, M, K, N)
    _grad_x_kernel[(cdiv(M, block_m) * cdiv(K, block_k),)](
        grad_out, h, weight, grad_x, scale, seed_ptr, M, N, K, threshold, inv_keep, BLOCK_M=block_m, BLOCK_K=block_k,
        BLOCK_N=block_n, GROUP_M=GROUP_M,
        EVEN_N=N % block_n == 0, num_warps=num_warps, num_stages=num_stages, **common,
    )

    block_k, block_n, block_m, num_warps, num_stages = config("grad_w", dtype, K, N, M)
    tiles = cdiv(N, block_n) * cdiv(K, block_k)
    split, chunk = split_rows(M, block_m, tiles, N * K, device, min_chunk)
    partial = dtype if split == 1 else torch.float32  # one chunk stores the result itself
    grad_weight = _empty(split, N, K, device=device, dtype=partial)
    grad_bias = _empty(split, N, device=device, dtype=partial) if has_bias else x.new_empty(0)
    _grad_w_kernel[(split * tiles,)](
        grad_out, h, x, grad_weight, grad_bias if has_bias else grad_weight, scale, seed_ptr, M, N, K, chunk,
        threshold, inv_keep, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m, EVEN_M=M % block_m == 0,
        HAS_BIAS=has_bias, num_warps=num_warps, num_stages=num_stages, **common,
    )
    grad_weight = grad_weight[0] if split == 1 else grad_weight.sum(0).to(dtype)
    if has_bias:
        grad_bias = grad_bias[0] if split == 1 else grad_bias.sum(0).to(dtype)
    return grad_x, grad_weight, grad_bias


# ------------------------------------------------------------------------------------------- sm_90 compile checks


def _sm90_check(dtype: torch.dtype, M: int, K: int, N: int, *, bias: bool = True, activation: str = "none",
                residual: bool = False, save: bool = True, backward_pass: bool = False, tf32: bool = False,
                dropout: bool = False, norm: bool = False, input_norm: bool = False) -> dict:
    """forward() (or backward()) on meta tensors: sm90.py (or tests) compile the kernels they launch."""

    def launch():
        with tf32_matmul(tf32):
            run()

    def run():
        def meta(*shape):
            return torch.empty(*shape, dtype=dtype, device="meta")

        x, weight = meta(M, K), meta(N, K)
        # dropout comes with stochastic depth's row scale, as in the encoder block's training
        row_scale, p = (meta(M), 0.1) if dropout else (None, 0.0)
        seed = torch.empty(1, dtype=torch.int64, device="meta") if dropout else None
        in_norm = (meta(K), meta(K)) if input_norm else (None, None)
        if not backward_pass:
            norm_args = (meta(N), meta(N)) if norm else (None, None)
            forward(x, weight, meta(N) if bias else None, meta(M, N) if residual else None, activation, save,
                    row_scale, p, seed, *norm_args, 1e-5, *in_norm)
            return
        h = meta(M, N) if activation == "gelu" else meta(0)
        in_stats = torch.empty(2, M, dtype=torch.float32, device="meta") if input_norm else None
        backward(meta(M, N), x, weight, bias, h, activation, row_scale, p, seed, *in_norm, in_stats)

    epilogue = "".join(["_bias" * bias, f"_{activation}" * (activation != "none"), "_res" * residual,
                        "_nosave" * ((activation == "gelu" or norm) and not save and not backward_pass),
                        "_dropout" * dropout, "_norm" * norm, "_innorm" * input_norm])
    name = (f"{'bwd' if backward_pass else 'fwd'}_{str(dtype).split('.')[-1]}{'_tf32' if tf32 else ''}"
            f"_M{M}_K{K}_N{N}{epilogue}")
    return {"name": name, "launch": launch}


def _sm90_grad_h_check(dtype: torch.dtype, M: int, N: int) -> dict:
    """_grad_h_rows() (the vendor backward's grad_h pass) with GELU', dropout and the row scale, on meta tensors."""

    def launch():
        rows = torch.empty(M, N, dtype=dtype, device="meta")
        _grad_h_rows(rows, rows, True, torch.empty(M, dtype=dtype, device="meta"), 0.1,
                     torch.empty(1, dtype=torch.int64, device="meta"))

    return {"name": f"grad_h_{str(dtype).split('.')[-1]}_M{M}_N{N}", "launch": launch}


def _sm90_norm_backward_check(dtype: torch.dtype, M: int, N: int) -> dict:
    """layer_norm_backward() (the LayerNorms' backward) on meta tensors."""

    def launch():
        rows = torch.empty(M, N, dtype=dtype, device="meta")
        stats = torch.empty(2, M, dtype=torch.float32, device="meta")
        layer_norm_backward(rows, rows, stats, torch.empty(N, dtype=dtype, device="meta"), True)

    return {"name": f"norm_bwd_{str(dtype).split('.')[-1]}_M{M}_N{N}", "launch": launch}


# The D=256 encoder block at M = 64 * 256 tokens (bf16): linear1 with GELU (training and inference), proj/linear2
# with the residual, qkv; their backwards; D=384's mlp (1152); batch 1; float32 (FMA and TF32); an odd shape.
SM90_CHECKS = [
    _sm90_check(torch.bfloat16, 16384, 256, 512, activation="gelu"),
    _sm90_check(torch.bfloat16, 16384, 256, 512, activation="gelu", save=False),
    _sm90_check(torch.bfloat16, 16384, 512, 256, residual=True),
    _sm90_check(torch.bfloat16, 16384, 256, 768, bias=False),
    _sm90_check(torch.bfloat16, 16384, 256, 512, activation="gelu", backward_pass=True),
    _sm90_check(torch.bfloat16, 16384, 512, 256, backward_pass=True),
    _sm90_check(torch.bfloat16, 12544, 384, 1152, activation="gelu", backward_pass=True),
    _sm90_check(torch.bfloat16, 256, 256, 512, activation="gelu", backward_pass=True),  # batch 1: 64x128 tiles
    _sm90_check(torch.bfloat16, 16384, 256, 512, activation="gelu", dropout=True),  # training with dropout
    _sm90_check(torch.bfloat16, 16384, 512, 256, residual=True, dropout=True),
    _sm90_check(torch.bfloat16, 16384, 256, 512, activation="gelu", backward_pass=True, dropout=True),
    _sm90_check(torch.bfloat16, 16384, 512, 256, backward_pass=True, dropout=True),
    _sm90_check(torch.bfloat16, 16384, 256, 256, residual=True, norm=True),  # proj + residual + norm1, training
    _sm90_check(torch.bfloat16, 16384, 256, 256, residual=True, norm=True, save=False),  # inference
    _sm90_check(torch.bfloat16, 12544, 384, 384, residual=True, norm=True),  # D = 384: 32 x 512 tiles
    _sm90_check(torch.float32, 16384, 256, 256, residual=True, norm=True),
    _sm90_check(torch.bfloat16, 16384, 256, 768, bias=False, input_norm=True),  # pre_norm + qkv
    _sm90_check(torch.bfloat16, 16384, 256, 768, bias=False, input_norm=True, backward_pass=True),
    _sm90_check(torch.float32, 16384, 256, 512, activation="gelu"),
    _sm90_check(torch.float32, 16384, 256, 512, activation="gelu", tf32=True),
    _sm90_check(torch.float32, 16384, 256, 512, activation="gelu", backward_pass=True),
    _sm90_check(torch.float32, 16384, 256, 512, activation="gelu", backward_pass=True, tf32=True),
    _sm90_check(torch.float16, 111, 48, 40, activation="gelu", residual=True),
    _sm90_check(torch.float16, 111, 48, 40, activation="gelu", backward_pass=True),
    _sm90_grad_h_check(torch.bfloat16, 16384, 512),  # linear1's grad_h pass ahead of the vendor GEMMs
    _sm90_norm_backward_check(torch.bfloat16, 16384, 256),  # pre_norm's and norm1's backward at D = 256
    _sm90_norm_backward_check(torch.bfloat16, 12544, 384),
]

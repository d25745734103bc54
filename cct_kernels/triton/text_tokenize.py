"""The text tokenizer stage in Triton: conv over the sequence (the kernel spans the whole word vector) as a GEMM over
windows, with the ReLU + max pool epilogue; forward and backward. Serves CUDA tensors (and CPU tensors under
TRITON_INTERPRET=1, for tests).

Shapes (see cct_kernels/ops/text_tokenize.py): x (B, L, C) contiguous, weight (E, k, C) contiguous; conv rows
Lc = (L + 2*pad - k) // stride + 1, tokens N (pooled, or Lc without pool); out (B, N, E) row-major. float32,
float16, bfloat16; products on tensor cores (tl.dot, float32 accumulation; exact fp32 'ieee' products for float32).
Limits: pool kernel <= 127 (int8 pool_index), tensors under 2**31 elements.

Forward, one kernel: program (tile of BLOCK_P tokens over (b, n), tile of BLOCK_E channels) runs, for each offset q
of the pool window, the GEMM [BLOCK_P, k*C] x [k*C, BLOCK_E] of the conv rows at that offset: the window of conv row
h is k*C contiguous values of x from row h*stride - pad (rows outside the sequence load as zeros), so the A tile is
a plain strided load, no im2col. A running max keeps the first maximum's offset (a NaN wins); ReLU is applied after
the pool (max(relu(v)) = relu(max(v))). The conv activation never reaches memory; overlapping pool windows
recompute conv rows (pk/ps: 1x for text_cct's 2/2/1 pool).

Backward, three kernels: (1) the conv-row gradient G (B, Lc, E) in x's dtype, gathered from pool_index (a token
passes its gradient to the row its window picked, where ReLU passed it: out not <= 0); (2) grad_weight (E, k*C) =
G^T @ windows, the reduction over B*Lc split into SPLIT parts written to a float32 workspace that torch sums
(deterministic, no atomics); (3) grad_x[b, i] = sum over taps j of G[b, (i + pad - j) / stride] @ W_j (rows whose
tap does not divide evenly or leaves the conv get nothing), one program per tile of input rows: no atomics.

Floors (H100 SXM, 3.35 TB/s, 989 TFLOP/s 16-bit), text_cct_6 (B=64, L=64, C=300, E=256, k=4, stride 1, pad 2,
pool 2/2/1) in bf16: forward 2*B*Lc*k*C*E = 2.56 GFLOP -> 2.6 us; bytes x 2.46 MB + w 0.6 MB + out 1.1 MB + index
0.54 MB = 4.7 MB -> 1.4 us. Backward twice the FLOPs (5.1 GFLOP, 5.2 us) and G written and read twice (2.1 MB).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from cct_kernels.triton._common import META_SM_COUNT, cdiv, next_power_of_2

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_POOL_KERNEL = 127  # offsets inside the window up to 126 fit the int8 pool_index
NUM_WARPS = 8  # the GEMM kernels' 64x64 tiles: 4 warps held 223 registers (bf16 forward) and spilled in float32


def unsupported(x, weight, stride, padding, relu, pool_kernel, pool_stride, pool_padding, *, backend="triton"):
    """Why the Triton kernels cannot serve these inputs, or None."""
    if x.dtype not in DTYPES:
        return f"triton text_tokenize supports float32, float16 and bfloat16, got {x.dtype}"
    if pool_kernel > MAX_POOL_KERNEL:
        return (f"triton text_tokenize stores the pool argmax as an int8 offset inside the window: pool kernel "
                f"<= {MAX_POOL_KERNEL}, got {pool_kernel}")
    B, L, C = x.shape
    E = weight.shape[0]
    if max(x.numel(), weight.numel(), B * (L + 2 * padding) * max(C, E)) >= 2**31:
        return "triton text_tokenize indexes with int32 inside a tensor; tensors must hold fewer than 2**31 elements"
    return None


# ---------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _forward_kernel(
    x_ptr, wt_ptr, out_ptr, idx_ptr, M, L, C, E, Lc, N,
    STRIDE: tl.constexpr, PAD: tl.constexpr, K: tl.constexpr,
    POOL_K: tl.constexpr, POOL_S: tl.constexpr, POOL_P: tl.constexpr, RELU: tl.constexpr, HAS_POOL: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out[b, n, e] = relu(max over q of conv row n*POOL_S - POOL_P + q); idx = the q of the first maximum.
    wt_ptr: the weight as (k*C, E) row-major (the B operand, E contiguous)."""
    pid_p = tl.program_id(0)
    pid_e = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # flat over (b, n)
    p_mask = offs_p < M
    bb = offs_p // N
    n = offs_p % N
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    x_rows = x_ptr + bb.to(tl.int64) * L * C
    chunks = tl.cdiv(C, BLOCK_K)
    best = tl.full([BLOCK_P, BLOCK_E], float("-inf"), tl.float32)
    best_q = tl.zeros([BLOCK_P, BLOCK_E], tl.int8)
    for q in range(0, POOL_K):  # window offsets in order: strict > keeps the first maximum
        h = n * POOL_S - POOL_P + q
        valid = p_mask & (h >= 0) & (h < Lc)  # outside the conv rows: the pool's -inf padding
        r0 = h * STRIDE - PAD
        acc = tl.zeros([BLOCK_P, BLOCK_E], tl.float32)
        for step in range(0, K * chunks):  # K steps over (tap j, chunk of BLOCK_K channels)
            j = step // chunks
            c = (step % chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
            c_mask = c < C
            r = r0 + j
            row_ok = valid & (r >= 0) & (r < L)  # the conv's zero padding
            a = tl.load(x_rows[:, None] + (r * C)[:, None] + c[None, :], mask=row_ok[:, None] & c_mask[None, :],
                        other=0.0)
            w = tl.load(wt_ptr + (j * C + c)[:, None] * E + offs_e[None, :], mask=c_mask[:, None] & e_mask[None, :],
                        other=0.0)
            if UPCAST:  # the CPU interpreter gets bf16 arithmetic wrong; exact bf16 products in fp32 instead
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        acc = tl.where(valid[:, None], acc, float("-inf"))
        take = (acc > best) | (acc != acc)  # a NaN wins and stays (max_pool2d: NaN in the window -> NaN)
        best = tl.where(take, acc, best)
        best_q = tl.where(take, tl.full([BLOCK_P, BLOCK_E], q, tl.int8), best_q)
    if RELU:
        best = tl.where(best < 0.0, 0.0, best)  # keeps NaN, as torch.relu does
    offs = offs_p[:, None] * E + offs_e[None, :]
    mask = p_mask[:, None] & e_mask[None, :]
    tl.store(out_ptr + offs, best.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_POOL:
        tl.store(idx_ptr + offs, best_q, mask=mask)


@triton.jit
def _grad_rows_kernel(
    g_ptr, out_ptr, idx_ptr, dy_ptr, M, E, Lc, N,
    POOL_K: tl.constexpr, POOL_S: tl.constexpr, POOL_P: tl.constexpr, RELU: tl.constexpr, HAS_POOL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dy[b, h, e] = sum of grad_out[b, n, e] over the tokens n whose window holds conv row h and picked it."""
    pid_m = tl.program_id(0)
    pid_e = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flat over (b, h)
    m_mask = offs_m < M
    bb = offs_m // Lc
    h = offs_m % Lc
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = m_mask[:, None] & (offs_e < E)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    n_last = (h + POOL_P) // POOL_S  # the windows holding row h start in (h - POOL_K, h]: ceil(K/S) of them
    for a in tl.static_range((POOL_K + POOL_S - 1) // POOL_S):
        n = n_last - a
        i = h + POOL_P - n * POOL_S  # offset of row h inside window n
        ok = mask & ((n >= 0) & (n < N) & (i < POOL_K))[:, None]
        offs = (bb * N + n)[:, None] * E + offs_e[None, :]
        if HAS_POOL:
            ok = ok & (tl.load(idx_ptr + offs, mask=ok, other=-1).to(tl.int32) == i[:, None])
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if RELU:  # ReLU's gradient passes where out is not <= 0, NaN included (torch's threshold_backward)
            g = tl.where(tl.load(out_ptr + offs, mask=ok, other=0.0) <= 0, 0.0, g)
        acc += g
    tl.store(dy_ptr + offs_m[:, None] * E + offs_e[None, :], acc.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_weight_kernel(
    dy_ptr, x_ptr, ws_ptr, M, L, C, E, Lc, KC, CHUNK,
    STRIDE: tl.constexpr, PAD: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_KC: tl.constexpr,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """ws[split, e, kk] = sum over conv rows m = (b, h) of this split's CHUNK of dy[m, e] * window(m)[kk], where
    window(m)[kk] = x[b, h*STRIDE - PAD + kk // C, kk % C] (zero outside the sequence)."""
    pid_e = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    kk = pid_k * BLOCK_KC + tl.arange(0, BLOCK_KC)
    kk_mask = kk < KC
    tap = kk // C
    acc = tl.zeros([BLOCK_E, BLOCK_KC], tl.float32)
    m_end = tl.minimum(split * CHUNK + CHUNK, M)
    for m0 in range(split * CHUNK, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_mask = m < m_end
        bb = m // Lc
        r0 = (m % Lc) * STRIDE - PAD
        dyt = tl.load(dy_ptr + m[None, :] * E + offs_e[:, None], mask=e_mask[:, None] & m_mask[None, :], other=0.0)
        r = r0[:, None] + tap[None, :]
        xt = tl.load(x_ptr + (bb * L + r0)[:, None] * C + kk[None, :],  # the window is contiguous from row r0
                     mask=m_mask[:, None] & kk_mask[None, :] & (r >= 0) & (r < L), other=0.0)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(dyt, xt, acc, input_precision=PRECISION)
    tl.store(ws_ptr + (split * E + offs_e[:, None]).to(tl.int64) * KC + kk[None, :], acc,
             mask=e_mask[:, None] & kk_mask[None, :])


@triton.jit
def _grad_x_kernel(
    dy_ptr, w_ptr, dx_ptr, M, L, C, E, Lc,
    STRIDE: tl.constexpr, PAD: tl.constexpr, K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """dx[b, i, c] = sum over taps j of dy[b, h, :] . w[:, j, c] with h*STRIDE = i + PAD - j, 0 <= h < Lc.
    w_ptr: the weight (E, k, C) row-major."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flat over (b, i)
    m_mask = offs_m < M
    bb = offs_m // L
    i = offs_m % L
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for j in range(0, K):
        t = i + PAD - j
        h = t // STRIDE
        row_ok = m_mask & (t >= 0) & (t % STRIDE == 0) & (h < Lc)
        dy_rows = dy_ptr + (bb * Lc + h) * E
        for e0 in range(0, E, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            e_mask = e < E
            g = tl.load(dy_rows[:, None] + e[None, :], mask=row_ok[:, None] & e_mask[None, :], other=0.0)
            w = tl.load(w_ptr + e[:, None] * (K * C) + j * C + offs_c[None, :], mask=e_mask[:, None] & c_mask[None, :],
                        other=0.0)
            if UPCAST:
                g = g.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(g, w, acc, input_precision=PRECISION)
    tl.store(dx_ptr + offs_m[:, None] * C + offs_c[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_mask[:, None] & c_mask[None, :])


# ---------------------------------------------------------------------------------------------------- launchers


def _empty(*shape, device, dtype):
    """Every uninitialised buffer the launchers allocate (tests replace it to poison them)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _sizes(x, weight, stride, padding, pool_kernel, pool_stride, pool_padding):
    """(conv rows Lc, tokens N, pool (kernel, stride, padding) with no pool as a 1-row window of stride 1)."""
    Lc = (x.shape[1] + 2 * padding - weight.shape[1]) // stride + 1
    if not pool_kernel:
        return Lc, Lc, (1, 1, 0)
    return Lc, (Lc + 2 * pool_padding - pool_kernel) // pool_stride + 1, (pool_kernel, pool_stride, pool_padding)


def config(dtype: torch.dtype) -> dict:
    """Tile sizes and GEMM precision: 16-bit products on tensor cores, float32 ones exact ('ieee', FMA units),
    with a shallower K step so that the operands fit registers."""
    fp32 = dtype == torch.float32
    return {"BLOCK": 64, "BLOCK_K": 16 if fp32 else 32, "PRECISION": "ieee" if fp32 else "tf32",
            "UPCAST": dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1", "num_warps": NUM_WARPS}


def forward(x, weight, stride, padding, relu, pool_kernel, pool_stride, pool_padding):
    """-> (out (B, N, E), pool_index int8 (B, N, E), or an empty (0,) tensor when pool_kernel == 0)."""
    B, L, C = x.shape
    E, K, _ = weight.shape
    Lc, N, (pk, ps, pp) = _sizes(x, weight, stride, padding, pool_kernel, pool_stride, pool_padding)
    out = _empty(B, N, E, device=x.device, dtype=x.dtype)
    index = _empty(*((B, N, E) if pool_kernel else (0,)), device=x.device, dtype=torch.int8)
    M = B * N
    if M == 0:
        return out, index
    cfg = config(x.dtype)
    wt = weight.reshape(E, K * C).t().contiguous()  # (k*C, E): E contiguous for the B operand
    block_e = max(16, min(cfg["BLOCK"], next_power_of_2(E)))
    grid = (cdiv(M, cfg["BLOCK"]), cdiv(E, block_e))
    _forward_kernel[grid](
        x, wt, out, index if pool_kernel else out, M, L, C, E, Lc, N,
        STRIDE=stride, PAD=padding, K=K, POOL_K=pk, POOL_S=ps, POOL_P=pp, RELU=relu, HAS_POOL=pool_kernel > 0,
        BLOCK_P=cfg["BLOCK"], BLOCK_E=block_e, BLOCK_K=cfg["BLOCK_K"], PRECISION=cfg["PRECISION"],
        UPCAST=cfg["UPCAST"], num_warps=cfg["num_warps"],
    )
    return out, index


def _split(M: int, tiles: int, block_m: int) -> int:
    """Parts of the grad_weight reduction over M conv rows: about two waves of programs on an H100/H200, each part
    >= 4 blocks."""
    return max(1, min(cdiv(M, 4 * block_m), cdiv(2 * META_SM_COUNT, tiles)))


def backward(grad_out, x, weight, out, pool_index, stride, padding, relu, pool_kernel, pool_stride, pool_padding,
             needs_input_grad=True):
    """-> (grad_x (B, L, C), or an empty tensor when not needs_input_grad; grad_weight (E, k, C))."""
    B, L, C = x.shape
    E, K, _ = weight.shape
    Lc, N, (pk, ps, pp) = _sizes(x, weight, stride, padding, pool_kernel, pool_stride, pool_padding)
    cfg = config(x.dtype)
    block = cfg["BLOCK"]
    block_e = max(16, min(block, next_power_of_2(E)))
    M = B * Lc
    dy = _empty(B, Lc, E, device=x.device, dtype=x.dtype)
    if M:
        _grad_rows_kernel[(cdiv(M, block), cdiv(E, block_e))](
            grad_out, out, pool_index if pool_kernel else out, dy, M, E, Lc, N,
            POOL_K=pk, POOL_S=ps, POOL_P=pp, RELU=relu, HAS_POOL=pool_kernel > 0, BLOCK_M=block, BLOCK_E=block_e,
            num_warps=4,
        )
    KC = K * C
    block_kc = max(16, min(block, next_power_of_2(KC)))
    tiles = cdiv(E, block_e) * cdiv(KC, block_kc)
    split = _split(M, tiles, cfg["BLOCK_K"]) if M else 1
    chunk = cdiv(max(M, 1), split)
    ws = _empty(split, E, KC, device=x.device, dtype=torch.float32)
    _grad_weight_kernel[(cdiv(E, block_e), cdiv(KC, block_kc), split)](
        dy, x, ws, M, L, C, E, Lc, KC, chunk, STRIDE=stride, PAD=padding, BLOCK_E=block_e, BLOCK_KC=block_kc,
        BLOCK_M=cfg["BLOCK_K"], PRECISION=cfg["PRECISION"], UPCAST=cfg["UPCAST"], num_warps=cfg["num_warps"],
    )
    grad_weight = ws.sum(0).view(E, K, C).to(weight.dtype)
    if not needs_input_grad:
        return x.new_empty(0), grad_weight
    grad_x = _empty(B, L, C, device=x.device, dtype=x.dtype)
    if B * L:
        block_c = max(16, min(block, next_power_of_2(C)))
        _grad_x_kernel[(cdiv(B * L, block), cdiv(C, block_c))](
            dy, weight, grad_x, B * L, L, C, E, Lc, STRIDE=stride, PAD=padding, K=K, BLOCK_M=block, BLOCK_C=block_c,
            BLOCK_E=max(16, min(cfg["BLOCK_K"] * 2, next_power_of_2(E))), PRECISION=cfg["PRECISION"],
            UPCAST=cfg["UPCAST"], num_warps=cfg["num_warps"],
        )
    return grad_x, grad_weight


# ------------------------------------------------------------------------------------------- sm_90 compile checks


def _sm90_check(name, B, L, C, E, k, stride, padding, relu, pool, dtype) -> dict:
    """forward() then backward() on meta tensors of one tokenizer: cct_kernels.triton.sm90 compiles what they
    launch (sm90.compile_launch over sm90.recorded_launches)."""
    pool_args = pool or (0, 1, 0)

    def launch():
        x = torch.empty(B, L, C, dtype=dtype, device="meta")
        weight = torch.empty(E, k, C, dtype=dtype, device="meta")
        out, index = forward(x, weight, stride, padding, relu, *pool_args)
        backward(torch.empty_like(out), x, weight, out, index, stride, padding, relu, *pool_args)

    return {"name": name, "launch": launch}


# The official text tokenizers at seq_len 64, word_dim 300: text_cct_6 (k=4, stride 1, pad 2, ReLU, pool 2/2/1,
# E=256), text_cvt_6 patches (k=4, stride 4, no ReLU, no pool, E=128), and text_cct_2's E=128 in float32.
SM90_CHECKS = [
    _sm90_check("text_cct_6_bf16", 64, 64, 300, 256, 4, 1, 2, True, (2, 2, 1), torch.bfloat16),
    _sm90_check("text_cvt_6_fp16", 64, 64, 300, 128, 4, 4, 0, False, None, torch.float16),
    _sm90_check("text_cct_2_fp32", 64, 64, 300, 128, 4, 1, 2, True, (2, 2, 1), torch.float32),
]

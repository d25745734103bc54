"""One tokenizer stage in Triton: conv2d (implicit GEMM) -> bias -> ReLU -> max pool, written straight to its layout.

Shapes (see cct_kernels/ops/tokenize.py): x (B, C_in, H, W) any strides, weight (C_out, C_in, KH, KW) contiguous,
bias (C_out,) or None; square stride/padding. The conv output is (Ho, Wo), the pooled one (Hp, Wp). Output
(B, Hp*Wp, C_out) row-major tokens if to_tokens, else (B, C_out, Hp, Wp) channels-last (the same channel-fastest
writes; the next stage reads it without a copy). float32, float16, bfloat16; products on tensor cores (tl.dot, fp32
accumulation; exact fp32 'ieee' products for float32 inputs).
Limits: pool windows up to 11x11 (pool_index is int8: offsets up to 120), tensors under 2**31 elements.

Forward, one kernel: program (tile of BLOCK_P pooled positions over (b, ph, pw), tile of BLOCK_C channels) runs,
for each of the pool window's k*k offsets, the implicit GEMM [BLOCK_P, C_in*KH*KW] x [C_in*KH*KW, BLOCK_C] that
gives the conv outputs at that offset (the im2col rows are gathered from x on the fly, zero outside the image),
and keeps a running max and its offset. The full-resolution conv activation is never written. The cost: overlapping
windows recompute conv outputs, (k/s)**2 = 2.25x the conv FLOPs for CCT's 3/2/1 pool (1x without pool); where
that makes the stage slower than cuDNN by the floors (the 224/384 models' 64 -> 384 stage), auto_declines leaves it
to cuDNN.
max(relu(v)) = relu(max(v)), so ReLU is applied once, after the pool. The offset kept is the first maximum of the
pre-ReLU conv in row-major window order (PyTorch's rule); where the output is 0 after ReLU its gradient is 0
whatever offset was kept, so this agrees with max_pool2d(relu(conv)) wherever it matters.

Backward: a Triton kernel gathers the gradient of the conv output (pre-ReLU): each conv position sums grad_out over
the pooled positions whose window holds it and whose argmax offset points at it (windows overlap, so a plain
scatter would race), masked by out > 0 under ReLU. Then torch.ops.aten.convolution_backward gives grad_x, grad_weight
and grad_bias: cuDNN's dgrad/wgrad are tuned for every shape, and a Triton wgrad (a reduction over B*Ho*Wo) and dgrad
would be a large amount of code for little gain; the price is writing and reading the full-resolution conv gradient.
"""
from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

from cct_kernels.triton._common import cdiv, next_power_of_2

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_POOL_KERNEL = 11  # the largest window whose row-major offsets (up to k*k - 1) fit in int8
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def unsupported(x, weight, bias, stride, padding, relu, pool_kernel, pool_stride, pool_padding, to_tokens, *,
                backend="triton"):
    """Why the Triton kernels cannot serve these inputs, or None."""
    if x.dtype not in DTYPES:
        return f"triton tokenize supports float32, float16 and bfloat16, got {x.dtype}"
    if pool_kernel > MAX_POOL_KERNEL:
        return (f"triton tokenize stores the pool argmax as an int8 offset inside the window, so pool windows are "
                f"limited to {MAX_POOL_KERNEL}x{MAX_POOL_KERNEL}; got {pool_kernel}x{pool_kernel}")
    if max(x.numel(), weight.numel()) >= 2**31:
        return "triton tokenize indexes inside a tensor with int32; tensors must hold fewer than 2**31 elements"
    B, _, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    Ho, Wo = (H + 2 * padding - KH) // stride + 1, (W + 2 * padding - KW) // stride + 1
    if B * C_out * Ho * Wo >= 2**31:
        return "triton tokenize indexes the conv output with int32; B*C_out*Ho*Wo must be below 2**31"
    return None


# H100 SXM (the smaller of the lent GPUs' bandwidths): HBM bytes/s, dense tensor-core FLOP/s for 16-bit and TF32
# operands, FP32 FMA FLOP/s (the kernel's exact 'ieee' float32 products).
HBM_BYTES_PER_S = 3.35e12
PEAK_FLOPS = {"16-bit": 989e12, "tf32": 494e12, "ieee": 67e12}


def floors(x, weight, stride, padding, pool_kernel, pool_stride, pool_padding, relu=True) -> tuple[float, float]:
    """Lower bounds (seconds, H100 SXM) on the forward of one stage: (this fused kernel, eager cuDNN).

    Fused: max(conv FLOPs x recompute / peak, (x + weight + out + int8 index) / HBM); overlapping pool windows make
    it evaluate each conv output Hp*Wp*k*k / (Ho*Wo) times ((3/2)**2 = 2.25 for CCT's 3/2/1 pool). Eager:
    max(conv FLOPs / peak, (x + weight + conv output) / HBM) for cuDNN's conv, then ReLU (read + write) and the pool
    (read, write out) pass over the conv output. cuDNN runs float32 on TF32 tensor cores when torch allows it."""
    B, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    Ho, Wo, Hp, Wp = _sizes(x, weight, stride, padding, pool_kernel, pool_stride, pool_padding)
    e = x.element_size()
    flops = 2 * B * Ho * Wo * C_out * C_in * KH * KW
    recompute = Hp * Wp * pool_kernel ** 2 / (Ho * Wo) if pool_kernel else 1.0
    inputs, conv, out = (x.numel() + weight.numel()) * e, B * C_out * Ho * Wo * e, B * C_out * Hp * Wp * e
    precision = forward_config(C_in, C_out, KH, KW, x.dtype)["PRECISION"]
    fused_peak = PEAK_FLOPS["16-bit" if e == 2 else precision]
    cudnn_peak = PEAK_FLOPS["16-bit" if e == 2 else ("tf32" if torch.backends.cudnn.allow_tf32 else "ieee")]
    fused = max(flops * recompute / fused_peak, (inputs + out + (out // e if pool_kernel else 0)) / HBM_BYTES_PER_S)
    epilogue = (2 * conv if relu else 0) + (conv + out if pool_kernel else 0)
    eager = max(flops / cudnn_peak, (inputs + conv) / HBM_BYTES_PER_S) + epilogue / HBM_BYTES_PER_S
    return fused, eager


def auto_declines(x, weight, bias, stride, padding, relu, pool_kernel, pool_stride, pool_padding, to_tokens, *,
                  backend="triton"):
    """Why "auto" should leave this stage to cuDNN (the cuda backend, or eager), or None: the fused kernel's floor
    is above cuDNN's conv + ReLU + pool. That is the compute-bound 7x7 stage 2 of the 224/384 models (64 -> 384
    channels), where recomputing 2.25x the conv costs more than the conv output's round trips through HBM; the RGB
    stems and the 32x32 models' stages stay here. backend="triton" by name still runs it."""
    fused, eager = floors(x, weight, stride, padding, pool_kernel, pool_stride, pool_padding, relu)
    if fused > eager:
        return (f"the fused triton stage's H100 floor ({fused * 1e6:.3g} us, overlapping pool windows recompute conv "
                f"outputs) is above cuDNN conv + ReLU + pool ({eager * 1e6:.3g} us)")
    return None


# ---------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, idx_ptr,
    M, C_in, H, W, C_out, Ho, Wo, Hp, Wp,
    sxb, sxc, sxh, sxw, sob, sop, soc,
    STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    POOL_K: tl.constexpr, POOL_S: tl.constexpr, POOL_P: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, HAS_POOL: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    FLAT_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[b, p, c] = relu(max over the pool window of conv(x)[b, c, oh, ow] + bias[c]); idx = window offset."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # flat over (b, ph, pw)
    p_mask = offs_p < M
    bb = offs_p // (Hp * Wp)
    p = offs_p % (Hp * Wp)
    ph = p // Wp
    pw = p % Wp
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C_out
    K = KH * KW * C_in  # GEMM reduction over (kh, kw, ci): w_ptr is the weight permuted to (KH, KW, C_in, C_out)
    x_rows = x_ptr + bb * sxb
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)
    best_q = tl.zeros([BLOCK_P, BLOCK_C], tl.int8)
    for q in range(0, POOL_K * POOL_K):  # window offsets in row-major order: strict > keeps the first maximum
        oh = ph * POOL_S - POOL_P + q // POOL_K
        ow = pw * POOL_S - POOL_P + q % POOL_K
        valid = p_mask & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)  # outside: the pool's -inf padding
        ih0 = oh * STRIDE - PAD
        iw0 = ow * STRIDE - PAD
        acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        if FLAT_K:
            # Few input channels (the RGB stage): one flat K of KH*KW*C_in, padded once to BLOCK_K, not per tap.
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_mask = k < K
                tap = k // C_in
                ih = ih0[:, None] + (tap // KW)[None, :]
                iw = iw0[:, None] + (tap % KW)[None, :]
                a_mask = valid[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a = tl.load(x_rows[:, None] + (k % C_in)[None, :] * sxc + ih * sxh + iw * sxw, mask=a_mask, other=0.0)
                wt = tl.load(w_ptr + k[:, None] * C_out + offs_c[None, :], mask=k_mask[:, None] & c_mask[None, :],
                             other=0.0)
                if UPCAST:  # the CPU interpreter gets bf16 arithmetic wrong; exact bf16 products in fp32 instead
                    a = a.to(tl.float32)
                    wt = wt.to(tl.float32)
                acc = tl.dot(a, wt, acc, input_precision=PRECISION)
        else:
            # K steps over (tap (kh, kw), chunk of BLOCK_K channels): the rows' bounds and addresses are vectors,
            # the channel chunk a contiguous run (x channels_last). One flat loop, so the compiler can pipeline it.
            chunks = tl.cdiv(C_in, BLOCK_K)
            for step in range(0, KH * KW * chunks):
                tap = step // chunks
                ci = (step % chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
                ci_mask = ci < C_in
                ih = ih0 + tap // KW
                iw = iw0 + tap % KW
                row_ok = valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a = tl.load(x_rows[:, None] + (ih * sxh + iw * sxw)[:, None] + ci[None, :],  # sxc == 1
                            mask=row_ok[:, None] & ci_mask[None, :], other=0.0)
                wt = tl.load(w_ptr + (tap * C_in + ci)[:, None] * C_out + offs_c[None, :],
                             mask=ci_mask[:, None] & c_mask[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    wt = wt.to(tl.float32)
                acc = tl.dot(a, wt, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += bias[None, :]
        acc = tl.where(valid[:, None], acc, float("-inf"))
        take = (acc > best) | (acc != acc)  # a NaN wins and stays (as in max_pool2d: NaN in the window -> NaN)
        best = tl.where(take, acc, best)
        best_q = tl.where(take, tl.full([BLOCK_P, BLOCK_C], q, tl.int8), best_q)
    if RELU:
        best = tl.where(best < 0.0, 0.0, best)  # keeps NaN (tl.maximum would return 0), as torch.relu does
    offs = bb[:, None] * sob + p[:, None] * sop + offs_c[None, :] * soc
    mask = p_mask[:, None] & c_mask[None, :]
    tl.store(out_ptr + offs, best.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_POOL:
        tl.store(idx_ptr + offs, best_q, mask=mask)


@triton.jit
def _grad_conv_kernel(
    g_ptr, out_ptr, idx_ptr, dy_ptr,
    M, C_out, Ho, Wo, Hp, Wp,
    sgb, sgp, sgc, sob, sop, soc, syb, syc, syh, syw,
    POOL_K: tl.constexpr, POOL_S: tl.constexpr, POOL_P: tl.constexpr,
    RELU: tl.constexpr, HAS_POOL: tl.constexpr, G_LIKE_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dy[b, c, oh, ow] = sum of grad_out[b, (ph, pw), c] over the windows holding (oh, ow) that picked it.

    grad_out (g) has its own (batch, flat pooled position, channel) strides (it arrives in whatever layout autograd
    hands over); out and pool_index share theirs (o). G_LIKE_OUT: g's strides are o's (the usual case), so one set
    of offsets serves the three loads (94 -> 80 registers on sm_90: 3 blocks of 8 warps per SM instead of 2)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flat over (b, oh, ow)
    m_mask = offs_m < M
    bb = offs_m // (Ho * Wo)
    oh = (offs_m % (Ho * Wo)) // Wo
    ow = offs_m % Wo
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C_out
    mask = m_mask[:, None] & c_mask[None, :]
    o_base = bb[:, None] * sob + offs_c[None, :] * soc
    g_base = o_base if G_LIKE_OUT else bb[:, None] * sgb + offs_c[None, :] * sgc
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    # The windows holding row oh start at ph*POOL_S - POOL_P in (oh - POOL_K, oh]: at most ceil(K/S) of them per axis.
    ph_last = (oh + POOL_P) // POOL_S
    pw_last = (ow + POOL_P) // POOL_S
    for a in tl.static_range((POOL_K + POOL_S - 1) // POOL_S):
        ph = ph_last - a
        i = oh + POOL_P - ph * POOL_S  # row offset of (oh, ow) inside window (ph, .)
        ok_h = (ph >= 0) & (ph < Hp) & (i < POOL_K)
        for c in tl.static_range((POOL_K + POOL_S - 1) // POOL_S):
            pw = pw_last - c
            j = ow + POOL_P - pw * POOL_S
            ok = mask & (ok_h & (pw >= 0) & (pw < Wp) & (j < POOL_K))[:, None]
            pos = (ph * Wp + pw)[:, None]
            o_offs = o_base + pos * sop
            if HAS_POOL:
                picked = tl.load(idx_ptr + o_offs, mask=ok, other=-1).to(tl.int32)
                ok = ok & (picked == (i * POOL_K + j)[:, None])
            if G_LIKE_OUT:
                g = tl.load(g_ptr + o_offs, mask=ok, other=0.0).to(tl.float32)
            else:
                g = tl.load(g_ptr + g_base + pos * sgp, mask=ok, other=0.0).to(tl.float32)
            if RELU:
                # ReLU's gradient passes where out is not <= 0, NaN included (torch's threshold_backward rule)
                g = tl.where(tl.load(out_ptr + o_offs, mask=ok, other=0.0) <= 0, 0.0, g)
            acc += g
    offs_y = bb[:, None] * syb + offs_c[None, :] * syc + (oh * syh + ow * syw)[:, None]
    tl.store(dy_ptr + offs_y, acc.to(dy_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------- launchers


def _empty(*shape, device, dtype, memory_format=torch.contiguous_format):
    """Every uninitialised buffer the launchers allocate (tests replace it to poison them)."""
    return torch.empty(*shape, device=device, dtype=dtype, memory_format=memory_format)


_TAPS: dict[int, tuple] = {}  # id(weight) -> (weakref to weight, its version, data_ptr, taps)


def _weight_taps(weight: torch.Tensor) -> torch.Tensor:
    """weight (C_out, C_in, KH, KW) permuted to (KH, KW, C_in, C_out) contiguous (GEMM K rows, C_out contiguous).

    Cached per weight tensor while it lives and is unchanged (same version counter and storage), so inference
    permutes each stage's weight once, not on every call; an optimizer step (an in-place update) re-permutes it."""
    if weight.is_inference():  # inference tensors have no version counter to validate a cache entry
        return weight.permute(2, 3, 1, 0).contiguous()
    key = id(weight)
    hit = _TAPS.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version and hit[2] == weight.data_ptr():
        return hit[3]
    taps = weight.detach().permute(2, 3, 1, 0).contiguous()
    _TAPS[key] = (weakref.ref(weight, lambda _: _TAPS.pop(key, None)), weight._version, weight.data_ptr(), taps)
    return taps


def _sizes(x, weight, stride, padding, pool_kernel, pool_stride, pool_padding):
    B, _, H, W = x.shape
    _, _, KH, KW = weight.shape
    Ho, Wo = (H + 2 * padding - KH) // stride + 1, (W + 2 * padding - KW) // stride + 1
    if pool_kernel:
        Hp = (Ho + 2 * pool_padding - pool_kernel) // pool_stride + 1
        Wp = (Wo + 2 * pool_padding - pool_kernel) // pool_stride + 1
    else:
        Hp, Wp = Ho, Wo
    return Ho, Wo, Hp, Wp


def _pool(pool_kernel, pool_stride, pool_padding):
    """No pool is a 1x1 window with stride 1."""
    return (pool_kernel, pool_stride, pool_padding) if pool_kernel else (1, 1, 0)


GRAD_BLOCK_M = 32  # with 64 channels and 8 warps: 8 elements per thread, about 80 registers on sm_90
FLAT_K_MAX_CHANNELS = 16  # below this many input channels one flat K beats padding each tap's channels to 16


def forward_config(C_in: int, C_out: int, KH: int, KW: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options for one conv stage."""
    flat = C_in < FLAT_K_MAX_CHANNELS
    fp32 = dtype == torch.float32
    # float32 products run on FMA units ('ieee'): a 64-deep K step there holds too many operands and spills on
    # sm_90 (255 registers, 648 bytes); 128 positions x 16-deep steps compile to 194 registers, no spills.
    return {
        "BLOCK_P": 128 if fp32 else 64,
        "BLOCK_C": max(16, min(64, next_power_of_2(C_out))),
        "BLOCK_K": 16 if fp32 else (32 if flat else max(16, min(32, next_power_of_2(C_in)))),
        "FLAT_K": flat,
        "PRECISION": "ieee" if fp32 else "tf32",  # 'tf32' only names the default for 16-bit
        "num_warps": 8,
        "num_stages": 2,
    }


def _out_strides(out, to_tokens):
    """(batch, flat pooled position, channel) strides of out: tokens (B, P, C) of any strides, or (B, C, Hp, Wp)
    NCHW- or channels-last-contiguous (a row is Wp positions: the flat position has stride w's stride)."""
    if to_tokens:
        return out.stride(0), out.stride(1), out.stride(2)
    return out.stride(0), out.stride(3), out.stride(1)


def _flat_positions(t, to_tokens):
    """t, or a channels-last copy when its (Hp, Wp) positions cannot be walked with one flat stride."""
    if to_tokens or t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous(memory_format=torch.channels_last)


def forward(x, weight, bias, stride, padding, relu, pool_kernel, pool_stride, pool_padding, to_tokens):
    """-> (out, pool_index int8 of out's shape, or empty when pool_kernel == 0)."""
    B, C_in, H, W = x.shape
    C_out, _, KH, KW = weight.shape
    Ho, Wo, Hp, Wp = _sizes(x, weight, stride, padding, pool_kernel, pool_stride, pool_padding)
    # The kernel writes channel-fastest, so the (B, C_out, Hp, Wp) output is channels-last: the layout the next
    # stage reads (no transpose between stages); the op's fake states it (cct_kernels/ops/tokenize.py).
    shape = (B, Hp * Wp, C_out) if to_tokens else (B, C_out, Hp, Wp)
    fmt = torch.contiguous_format if to_tokens else torch.channels_last
    out = _empty(*shape, device=x.device, dtype=x.dtype, memory_format=fmt)
    if pool_kernel:
        index = _empty(*shape, device=x.device, dtype=torch.int8, memory_format=fmt)
    else:
        index = _empty(0, device=x.device, dtype=torch.int8)
    M = B * Hp * Wp
    if M == 0 or C_out == 0:
        return out, index
    cfg = forward_config(C_in, C_out, KH, KW, x.dtype)
    if not cfg["FLAT_K"]:
        # A tap's channels: one contiguous run per position. No copy when x is a previous stage's output.
        x = x.contiguous(memory_format=torch.channels_last)
    w_taps = _weight_taps(weight)
    pk, ps, pp = _pool(pool_kernel, pool_stride, pool_padding)
    grid = (cdiv(M, cfg["BLOCK_P"]), cdiv(C_out, cfg["BLOCK_C"]))
    _forward_kernel[grid](
        x, w_taps, bias if bias is not None else weight, out, index if pool_kernel else out,
        M, C_in, H, W, C_out, Ho, Wo, Hp, Wp,
        *x.stride(), *_out_strides(out, to_tokens),
        STRIDE=stride, PAD=padding, KH=KH, KW=KW, POOL_K=pk, POOL_S=ps, POOL_P=pp,
        HAS_BIAS=bias is not None, RELU=relu, HAS_POOL=pool_kernel > 0,
        UPCAST=x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1", **cfg,
    )
    return out, index


def backward(grad_out, x, weight, bias, out, pool_index, stride, padding, relu, pool_kernel, pool_stride,
             pool_padding, to_tokens, needs_input_grad=True):
    """-> (grad_x or an empty tensor when not needs_input_grad, grad_weight, grad_bias or an empty tensor when
    bias is None), in any layout (ops.tokenize gives them theirs). grad_out in any layout."""
    B, C_in, H, W = x.shape
    C_out = weight.shape[0]
    Ho, Wo, Hp, Wp = _sizes(x, weight, stride, padding, pool_kernel, pool_stride, pool_padding)
    # The conv gradient channels-last, like out: the gather reads and writes channel-fastest.
    grad_conv = _empty(B, C_out, Ho, Wo, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    M = B * Ho * Wo
    if M and C_out:
        grad_out, out = _flat_positions(grad_out, to_tokens), _flat_positions(out, to_tokens)
        if pool_kernel and pool_index.stride() != out.stride():  # the gather reads both at the same offsets
            pool_index = torch.empty_like(out, dtype=torch.int8).copy_(pool_index)
        pk, ps, pp = _pool(pool_kernel, pool_stride, pool_padding)
        block_c = max(16, min(64, next_power_of_2(C_out)))
        grid = (cdiv(M, GRAD_BLOCK_M), cdiv(C_out, block_c))
        g_strides, o_strides = _out_strides(grad_out, to_tokens), _out_strides(out, to_tokens)
        _grad_conv_kernel[grid](
            grad_out, out, pool_index if pool_kernel else out, grad_conv,
            M, C_out, Ho, Wo, Hp, Wp, *g_strides, *o_strides, *grad_conv.stride(),
            POOL_K=pk, POOL_S=ps, POOL_P=pp, RELU=relu, HAS_POOL=pool_kernel > 0, G_LIKE_OUT=g_strides == o_strides,
            BLOCK_M=GRAD_BLOCK_M, BLOCK_C=block_c, num_warps=8,
        )
    # x and weight channels-last like grad_conv: with an NCHW x, ATen copied grad_conv to NCHW (the H200 trace, cct_7
    # training at batch 128: 200 µs for 67 MB) and cuDNN then converted it back to NHWC for its kernel (53 µs)
    cl = torch.channels_last
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_conv, x.contiguous(memory_format=cl), weight.contiguous(memory_format=cl),
        [C_out] if bias is not None else None, [stride, stride], [padding, padding], [1, 1], False, [0, 0], 1,
        [needs_input_grad, True, bias is not None],
    )
    # Distinct empty tensors: outputs of a registered op must not alias each other.
    return (grad_x if needs_input_grad else x.new_empty(0), grad_weight,
            grad_bias if bias is not None else x.new_empty(0))


# ------------------------------------------------------------------------------------------- sm_90 compile checks

# (name, C_in, C_out, kernel, stride, padding, pool, relu, bias, to_tokens, dtype, input size): the CCT and CVT
# stages at the resolution each sees (stage 2 of the 32x32 model gets 16x16, of the 224 model 56x56).
_STAGES = [
    ("cct_3x1_stage1_3to256", 3, 256, 3, 1, 1, (3, 2, 1), True, False, True, torch.bfloat16, 32),
    ("cct_3x2_stage1_3to64", 3, 64, 3, 1, 1, (3, 2, 1), True, False, False, torch.bfloat16, 32),
    ("cct_3x2_stage2_64to128", 64, 128, 3, 1, 1, (3, 2, 1), True, False, True, torch.bfloat16, 16),
    ("cct_7x2_stage1_3to64", 3, 64, 7, 2, 3, (3, 2, 1), True, False, False, torch.bfloat16, 224),
    ("cct_7x2_stage2_64to384", 64, 384, 7, 2, 3, (3, 2, 1), True, False, True, torch.bfloat16, 56),
    ("cvt_patch_3to256_fp16", 3, 256, 4, 4, 0, None, False, True, True, torch.float16, 32),
    ("cct_3x1_stage1_fp32", 3, 256, 3, 1, 1, (3, 2, 1), True, False, True, torch.float32, 32),
]


def _sm90_check(name, c_in, c_out, k, stride, padding, pool, relu, bias, to_tokens, dtype, size, B=2) -> dict:
    """forward() (and backward() for bf16) on meta tensors of one stage: sm90.py compiles what they launch."""
    pool_args = pool or (0, 1, 0)

    def launch():
        x = torch.empty(B, c_in, size, size, dtype=dtype, device="meta")
        weight = torch.empty(c_out, c_in, k, k, dtype=dtype, device="meta")
        b = torch.empty(c_out, dtype=dtype, device="meta") if bias else None
        out, index = forward(x, weight, b, stride, padding, relu, *pool_args, to_tokens)
        if dtype == torch.bfloat16:
            backward(torch.empty_like(out), x, weight, b, out, index, stride, padding, relu, *pool_args, to_tokens)

    return {"name": name, "launch": launch}


SM90_CHECKS = [_sm90_check(*stage) for stage in _STAGES]

"""Flash attention (forward and backward) in Triton, reading q/k/v straight out of the packed qkv projection.

Kernel-module interface of cct_kernels.backends for the op cct_kernels.ops.attention:
    unsupported(qkv, num_heads, scale, dropout_p, lengths=None, *, backend) -> str | None
    forward(qkv, num_heads, scale, dropout_p, seed, lengths=None) -> (out (B, N, H*d) qkv.dtype, lse (B, H, N) fp32)
    backward(grad_out, qkv, out, lse, num_heads, scale, dropout_p, seed, lengths=None) -> grad_qkv (B, N, 3*H*d)
    dropout_mask(seed, B, H, N, dropout_p, device) -> (B, H, N, N) bool keep mask the kernels use (for tests)
The kernels: attention_forward.py (forward), attention_backward.py (dQ, dK/dV), attention_dropout.py (keep bits).

Layout: qkv (B, N, 3*H*d) is read as (B, N, 3, H, d) through strides (last dim contiguous); out is written as
(B, N, H*d) and grad_qkv as (B, N, 3, H, d), so no permute copies. lse is the natural-log softmax normaliser
(log-sum-exp of the scaled scores) per row, which the backward uses to recompute probabilities.

Algorithm: flash-attention 2. The forward streams key/value blocks with an online softmax and never holds an
N x N matrix. The backward runs two kernels and no atomics (deterministic): the dQ kernel (one program per query
block, streaming keys) also computes delta = rowsum(dO * O) and stores it; the dK/dV kernel (one program per key
block, streaming queries) runs after it and reads delta.
Key padding (lengths, (B,) int64 on qkv's device, 0 <= lengths[b] <= N: the real tokens of sequence b are its
first lengths[b]), flash-style as FlashAttention's varlen path: every query row, padded ones included, attends to
the real keys only; key loops stop at the sequence's length (key blocks of padding are neither loaded nor
computed, the partial block is masked), and a dK/dV program whose key block is all padding writes zeros without
looping. A sequence without real tokens gives out = 0, lse = -inf and zero gradients. The drop mask does not
depend on lengths (padded keys are simply excluded). Without lengths the kernels compile as before (HAS_LENGTHS).

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
the keep mask as bits, one bit per score in the lane order of a tensor-core tile, from Philox4x32-7 keyed on the
int64 seed tensor (one byte per key: the drop rate is p rounded to a multiple of 1/256; kept probabilities are
scaled by 1 / (1 - p)). The forward and dQ kernels read query-major bits, the dK/dV kernel key-major ones (the
backward redraws both: B*H*N*N/4 bytes are cheaper to redraw than to keep), so every kernel and dropout_mask()
see the same mask.
Under TRITON_INTERPRET=1 (CPU tensors, tests only) bfloat16 values are upcast to float32 right after loading,
since the interpreter computes bfloat16 arithmetic wrongly.
"""
from __future__ import annotations

import torch

from cct_kernels.triton._common import cdiv, dot_precision, next_power_of_2, tf32_matmul, upcast_bfloat16
from cct_kernels.triton.attention_backward import _attn_bwd_dkdv, _attn_bwd_dq
from cct_kernels.triton.attention_dropout import (  # noqa: F401 (dropout_mask, dropout_threshold: interface)
    SPAN, _dropout_bits, _no_bits, dropout_mask, dropout_threshold,
)
from cct_kernels.triton.attention_forward import LOG2E, _attn_fwd

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128


# ----------------------------------------------------------------------------------------------------------
# configs: a small heuristic table (no autotuning: the interpreter cannot autotune, and these shapes are few)
# ----------------------------------------------------------------------------------------------------------

# (pass, float32 input?, BLOCK_D <= 64?, dropout?) -> (BLOCK_M, BLOCK_N, num_warps, num_stages); dropout None =
# either. fwd and dq: BLOCK_M queries per program, BLOCK_N keys per step; dkdv: BLOCK_N keys per program, BLOCK_M
# queries per step. Chosen from the sm_90 figures (benchmarks/results/sm90_static.json): no spills, fewest SASS
# instructions per score element. With dropout each thread reads one word of keep bits per row (lane order, see
# attention_dropout.py): the d=64 forward does best with 8 warps and 128-key steps (a whole word per step; 64-key
# steps cost 14.0 instead of 12.2 instructions per score). float32 runs dot on FMA units unless TF32 is allowed
# (smaller tiles, 8 warps). Block sizes are powers of two from 8 to SPAN (128, the keep bits' word group).
_CONFIGS = {
    ("fwd", False, True, False): (128, 64, 4, 3),
    ("fwd", False, True, True): (128, 128, 8, 3),
    ("fwd", False, False, None): (128, 64, 8, 3),
    ("fwd", True, True, None): (64, 32, 8, 2),
    ("fwd", True, False, False): (64, 32, 8, 2),
    ("fwd", True, False, True): (32, 32, 4, 2),  # 64 queries or 8 warps spill 8-36 bytes with dropout
    ("dq", False, True, None): (64, 64, 4, 2),
    ("dq", False, False, None): (128, 64, 8, 2),  # 64 queries on 8 warps: 24.2 instead of 10.2 per score at d=128
    ("dq", True, True, False): (32, 32, 8, 2),  # 64 queries: ptxas spills 8 bytes at 80 registers
    ("dq", True, True, True): (32, 32, 4, 2),  # 8 warps spill 8 bytes at 64 registers with dropout
    ("dq", True, False, None): (32, 32, 8, 2),
    ("dkdv", False, True, None): (64, 64, 4, 2),
    ("dkdv", False, False, None): (32, 128, 8, 2),
    ("dkdv", True, True, None): (32, 64, 8, 2),
    ("dkdv", True, False, False): (32, 32, 8, 1),
    ("dkdv", True, False, True): (32, 32, 8, 2),  # one stage spills 48 bytes with dropout
}

# Head dims in the 128-wide tile class whose head rows are not 16-byte aligned (text_transformer's 75: 150 bytes in
# 16-bit, 300 in float32) load element by element, with a 64-bit pointer per element: these tiles keep those in
# registers (the table's 16-bit tiles spill 48-1164 bytes at d=75, its float32 dropout tiles 80-232).
# (pass, float32 input?, dropout?) -> as _CONFIGS.
_UNALIGNED_CONFIGS = {
    ("fwd", False, None): (128, 32, 8, 3),
    ("dq", False, None): (32, 32, 8, 2),  # 4 warps: 28% fewer instructions per score, 88 bytes of spills with dropout
    ("dkdv", False, False): (16, 64, 8, 2),
    ("dkdv", False, True): (16, 64, 8, 1),  # two stages spill 16 bytes with dropout
    ("fwd", True, False): (64, 32, 8, 2),
    ("fwd", True, True): (32, 32, 8, 2),
    ("dq", True, None): (32, 32, 8, 2),
    ("dkdv", True, None): (32, 32, 8, 1),
}
MIN_BLOCK_M = 64  # one warpgroup's wgmma tile


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def _config(kind: str, dtype: torch.dtype, head_dim: int, dropout: bool, N: int,
            aligned: bool = True) -> tuple[int, int, int, int]:
    """The table's entry, with both block sizes cut to N rounded up to a power of two (at least MIN_BLOCK_M
    queries, 32 keys): at N = 64 (cct_2) a 128-wide tile would be half padding (and half the programs)."""
    key = (kind, dtype == torch.float32, _block_d(head_dim) <= 64)
    table = _CONFIGS
    if not aligned and not key[2]:
        key, table = key[:2], _UNALIGNED_CONFIGS
    block_m, block_n, num_warps, num_stages = table.get(key + (dropout,)) or table[key + (None,)]
    fit = next_power_of_2(N)
    cut_m, cut_n = min(block_m, max(MIN_BLOCK_M, fit)), min(block_n, max(32, fit))
    if (cut_m, cut_n) != (block_m, block_n) and dtype != torch.float32 and head_dim <= 64:
        num_warps = 4  # a cut 16-bit tile (at most 64 x 64): one warpgroup; 8 warps would idle on overhead
    return cut_m, cut_n, num_warps, num_stages




# ----------------------------------------------------------------------------------------------------------
# launchers (the kernel-module interface)
# ----------------------------------------------------------------------------------------------------------


def unsupported(qkv: torch.Tensor, num_heads: int, scale: float, dropout_p: float, lengths=None, *,
                backend: str = "triton"):
    """Why these kernels cannot run this call (a sentence), or None when they can."""
    if lengths is not None and (lengths.dtype != torch.int64 or tuple(lengths.shape) != (qkv.shape[0],)):
        return f"triton attention takes lengths as a (B,) int64 tensor, got {lengths.dtype} {tuple(lengths.shape)}"
    if qkv.dtype not in DTYPES:
        return f"triton attention supports float32, float16 and bfloat16, got {qkv.dtype}"
    head_dim = qkv.shape[2] // (3 * num_heads)
    if head_dim > MAX_HEAD_DIM:
        return f"triton attention supports head dim <= {MAX_HEAD_DIM}, got {head_dim}"
    if qkv.numel() == 0:
        return "triton attention needs a non-empty qkv"
    if qkv.stride(2) != 1:
        return "triton attention needs qkv's last dim contiguous"
    programs = qkv.shape[0] * num_heads * cdiv(qkv.shape[1], 32)
    if programs > 2**31 - 1:
        return f"triton attention needs batch * num_heads * ceil(N / 32) < 2**31 (its grid), got {programs}"
    return None




def _aligned(*tensors: torch.Tensor, head_dim: int) -> bool:
    """16-byte aligned base pointers, row/batch strides and head offsets: the loads can be 16-byte vectors."""
    size = tensors[0].element_size()
    return (head_dim * size) % 16 == 0 and all(
        t.data_ptr() % 16 == 0 and all((st * size) % 16 == 0 for st in t.stride()[:-1]) for t in tensors
    )


def _lengths_arg(lengths: torch.Tensor | None, device) -> torch.Tensor:
    """The Lengths pointer: the lengths, or without them a cached placeholder the kernels never read."""
    return _no_bits(torch.device(device)) if lengths is None else lengths


def forward(qkv, num_heads, scale, dropout_p, seed, lengths=None, *, out=None, lse=None):
    """Attention forward. qkv (B, N, 3*H*d) fp32/fp16/bf16 with a contiguous last dim; seed int64 (1,) if
    dropout_p > 0; lengths None or (B,) int64 on qkv's device (key padding, see the module docstring). Returns out
    (B, N, H*d) qkv.dtype and lse (B, H, N) float32 (-inf for the rows of a sequence without real tokens).
    `out`/`lse` may be given preallocated (tests fill them with NaN to catch unwritten elements)."""
    B, N, three_hd = qkv.shape
    H = num_heads
    D = three_hd // (3 * H)
    if out is None:
        out = torch.empty(B, N, H * D, dtype=qkv.dtype, device=qkv.device)
    if lse is None:
        lse = torch.empty(B, H, N, dtype=torch.float32, device=qkv.device)
    bits, _ = _dropout_bits(seed, B, H, N, dropout_p, qkv.device)
    aligned = _aligned(qkv, out, head_dim=D)
    BLOCK_M, BLOCK_N, num_warps, num_stages = _config("fwd", qkv.dtype, D, dropout_p > 0, N, aligned)
    _attn_fwd[(B * H * cdiv(N, BLOCK_M),)](
        qkv, out, lse, bits, _lengths_arg(lengths, qkv.device),
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        N, H, scale * LOG2E, 1.0 / (1.0 - dropout_p),
        D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(D), DROPOUT=dropout_p > 0,
        HAS_LENGTHS=lengths is not None, UPCAST=upcast_bfloat16(qkv.dtype), ALIGNED=aligned,
        PRECISION=dot_precision(qkv.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def backward(grad_out, qkv, out, lse, num_heads, scale, dropout_p, seed, lengths=None, *, grad_qkv=None):
    """Attention backward. grad_out and out (B, N, H*d), qkv (B, N, 3*H*d), all of one dtype with contiguous
    last dims; lse (B, H, N) float32 contiguous from forward(); the same seed and lengths as the forward. Returns
    grad_qkv (B, N, 3*H*d) qkv.dtype, contiguous (every element written: dq, dk, dv slots; zeros for padded keys
    and for sequences without real tokens); it may be given preallocated (any strides with a contiguous last dim)."""
    B, N, three_hd = qkv.shape
    H = num_heads
    D = three_hd // (3 * H)
    if grad_qkv is None:
        grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    lse = lse.contiguous()
    delta = torch.empty(B, H, N, dtype=torch.float32, device=qkv.device)
    bits, bits_t = _dropout_bits(seed, B, H, N, dropout_p, qkv.device, key_major=True)  # redrawn, see above
    aligned = _aligned(qkv, out, grad_out, grad_qkv, head_dim=D)
    common = dict(D=D, BLOCK_D=_block_d(D), DROPOUT=dropout_p > 0, HAS_LENGTHS=lengths is not None,
                  UPCAST=upcast_bfloat16(qkv.dtype), ALIGNED=aligned, PRECISION=dot_precision(qkv.dtype))
    lengths_arg = _lengths_arg(lengths, qkv.device)
    keep_scale = 1.0 / (1.0 - dropout_p)

    BLOCK_M, BLOCK_N, num_warps, num_stages = _config("dq", qkv.dtype, D, dropout_p > 0, N, aligned)
    _attn_bwd_dq[(B * H * cdiv(N, BLOCK_M),)](
        qkv, out, grad_out, lse, delta, grad_qkv, bits, lengths_arg,
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
        grad_qkv.stride(0), grad_qkv.stride(1),
        N, H, scale, keep_scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps, num_stages=num_stages, **common,
    )
    BLOCK_M, BLOCK_N, num_warps, num_stages = _config("dkdv", qkv.dtype, D, dropout_p > 0, N, aligned)
    _attn_bwd_dkdv[(B * H * cdiv(N, BLOCK_N),)](
        qkv, grad_out, lse, delta, grad_qkv, bits_t, lengths_arg,
        qkv.stride(0), qkv.stride(1), grad_out.stride(0), grad_out.stride(1), grad_qkv.stride(0), grad_qkv.stride(1),
        N, H, scale, keep_scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps, num_stages=num_stages, **common,
    )
    return grad_qkv


# ----------------------------------------------------------------------------------------------------------
# sm_90 compile checks (cct_kernels/triton/sm90.py): the launchers themselves, on meta tensors
# ----------------------------------------------------------------------------------------------------------


def _sm90_check(dtype: torch.dtype, head_dim: int, dropout: bool, backward_pass: bool, N: int = 256,
                B: int = 2, H: int = 4, tf32: bool = False, padded: bool = False) -> dict:
    """forward() (or backward()) on meta tensors of (B, N, H, head_dim), with key-padding lengths if `padded`:
    sm90.py compiles what they launch."""
    p = 0.1 if dropout else 0.0

    def launch():
        with tf32_matmul(tf32):
            run()

    def run():
        qkv = torch.empty(B, N, 3 * H * head_dim, dtype=dtype, device="meta")
        seed = torch.empty(1, dtype=torch.int64, device="meta")
        lengths = torch.empty(B, dtype=torch.int64, device="meta") if padded else None
        if not backward_pass:
            forward(qkv, H, head_dim**-0.5, p, seed, lengths)
            return
        out = torch.empty(B, N, H * head_dim, dtype=dtype, device="meta")
        lse = torch.empty(B, H, N, dtype=torch.float32, device="meta")
        backward(torch.empty_like(out), qkv, out, lse, H, head_dim**-0.5, p, seed, lengths)

    name = (f"{'bwd' if backward_pass else 'fwd'}_{str(dtype).split('.')[-1]}{'_tf32' if tf32 else ''}_d{head_dim}_N{N}"
            f"{'_lengths' if padded else ''}{'_dropout' if dropout else ''}")
    return {"name": name, "launch": launch, "score_elements": _score_elements}


def _score_elements(kwargs: dict) -> int:
    """Scores per loop iteration: an attention kernel's tile, or the keep bits kernel's SPAN x SPAN."""
    return kwargs["BLOCK_M"] * kwargs["BLOCK_N"] if "BLOCK_M" in kwargs else SPAN * SPAN


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
] + [_sm90_check(torch.float32, 64, False, backward_pass, tf32=True) for backward_pass in (False, True)] + [
    # key padding: the CCT tile class with and without dropout, and text_transformer's head dim 75 (300 / 4;
    # unaligned, see _UNALIGNED_CONFIGS) at its N = 65 (64 tokens and the class token)
    _sm90_check(torch.bfloat16, head_dim, dropout, backward_pass, N=N, padded=True)
    for head_dim, N, dropout in ((64, 256, False), (64, 256, True), (75, 65, False), (75, 65, True))
    for backward_pass in (False, True)
] + [
    _sm90_check(torch.float32, 75, dropout, backward_pass, N=65, padded=True)
    for dropout in (False, True)
    for backward_pass in (False, True)
]

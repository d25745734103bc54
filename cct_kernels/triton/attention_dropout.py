"""Attention-probability dropout for the Triton attention kernels: the keep mask as bits, drawn once per pass.

_dropout_bits_kernel draws keep(b, h, query i, key j) for every score and stores it as bits, (B*H, N, ceil(N/32))
int32, bit j % 32 of word j // 32 of row i; the forward, dQ and dK/dV kernels (attention.py) read them with
_kept / _kept_t, 32 keys per loaded word. The draw: Philox4x32-7 keyed on the int64 seed, one call per (16 keys,
query, b*H + h) counter, one byte per key, kept when the byte >= dropout_threshold(p) = round(256 p) (the drop
rate is p rounded to a multiple of 1/256, at most 255/256; kept values are scaled by 1 / (1 - p), as in
flash-attention 2). dropout_mask() unpacks the same bits, so tests compare against exactly the kernels' mask.
Why bits rather than Philox inside each attention kernel: see the sm_90 figures in benchmarks/NOTES.md.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_PHILOX_ROUNDS = tl.constexpr(7)  # Philox4x32-7 passes BigCrush (Salmon et al., 2011); 10 rounds would cost 40% more ALU.
_KEYS_PER_DRAW = tl.constexpr(16)  # 128 random bits per Philox call, one byte per key


@triton.jit
def _dropout_keep(seed, bh, row0, col0, threshold, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_Q, BLOCK_K) keep mask for queries row0 + i and keys col0 + j of head bh (col0 a multiple of 16).

    One Philox4x32-7 call gives the 128 random bits of _KEYS_PER_DRAW (16) consecutive keys of a query (counters
    (j // 16, i, bh, 0), key `seed`): key j takes byte j % 4 of output word (j % 16) // 4 and is kept when that
    byte >= threshold (see dropout_threshold). Only the draw kernel calls this; the attention kernels and
    dropout_mask() read the bits it wrote, so every pass sees the same mask."""
    rows = row0 + tl.arange(0, BLOCK_Q)
    draws = col0 // _KEYS_PER_DRAW + tl.arange(0, BLOCK_K // _KEYS_PER_DRAW)
    draw_idx, row_idx = draws[None, :] + rows[:, None] * 0, rows[:, None] + draws[None, :] * 0
    zero = draw_idx * 0
    r0, r1, r2, r3 = tl.philox(seed, draw_idx.to(tl.uint32), row_idx.to(tl.uint32), (zero + bh).to(tl.uint32),
                               zero.to(tl.uint32), _PHILOX_ROUNDS)
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [..., 2, 2]: element (a, b) is word 2a + b
    words = tl.reshape(words, [BLOCK_Q, BLOCK_K // _KEYS_PER_DRAW, 4, 1])
    # Byte k of a word compared in place: (word & (255 << 8k)) >= threshold << 8k, no shift per element.
    shifts = tl.arange(0, 4).to(tl.uint32) * 8
    masks = tl.full([4], 255, tl.uint32) << shifts
    limits = (shifts * 0 + threshold).to(tl.uint32) << shifts  # threshold may arrive as the constexpr 1
    keep = (words & masks[None, None, None, :]) >= limits[None, None, None, :]
    return tl.reshape(keep, [BLOCK_Q, BLOCK_K])


@triton.jit
def _bitwise_or(a, b):
    return a | b


@triton.jit
def _dropout_bits_kernel(Bits, Seed, N, words_per_row, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Bits (B*H, N, words_per_row) int32: bit k of word w of query i of head bh is the keep flag of key 32w + k
    (from _dropout_keep). One program: BLOCK_M queries of head program_id(0) // cdiv(N, BLOCK_M), BLOCK_N keys (a
    multiple of 32) per step."""
    blocks = tl.cdiv(N, BLOCK_M)
    bh = tl.program_id(0) // blocks
    row0 = (tl.program_id(0) % blocks) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    seed = tl.load(Seed)
    bit = tl.full([32], 1, tl.int32) << tl.arange(0, 32)
    words = tl.arange(0, BLOCK_N // 32)
    base = Bits + bh.to(tl.int64) * N * words_per_row
    for start in range(0, N, BLOCK_N):
        keep = _dropout_keep(seed, bh, row0, start, threshold, BLOCK_M, BLOCK_N)
        flags = tl.reshape(keep.to(tl.int32), [BLOCK_M, BLOCK_N // 32, 32]) * bit[None, None, :]
        w = start // 32 + words
        tl.store(base + rows[:, None] * words_per_row + w[None, :], tl.reduce(flags, 2, _bitwise_or),
                 mask=(rows[:, None] < N) & (w[None, :] < words_per_row))


@triton.jit
def _kept(Bits, bh, rows, col0, N, words_per_row, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_Q, BLOCK_K) keep flags of queries `rows` and keys col0 .. col0 + BLOCK_K - 1 (col0 and BLOCK_K
    multiples of 32), read from the bits _dropout_bits_kernel wrote."""
    w = col0 // 32 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(Bits + bh.to(tl.int64) * N * words_per_row + rows[:, None] * words_per_row + w[None, :],
                    mask=(rows[:, None] < N) & (w[None, :] < words_per_row), other=0)
    bit = tl.full([32], 1, tl.int32) << tl.arange(0, 32)
    return tl.reshape((words[:, :, None] & bit[None, None, :]) != 0, [BLOCK_Q, BLOCK_K])


@triton.jit
def _kept_t(Bits, bh, rows, col0, N, words_per_row, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """The transpose of _kept: (BLOCK_K, BLOCK_Q), keys first, for the dK/dV kernel's transposed tiles."""
    w = col0 // 32 + tl.arange(0, BLOCK_K // 32)
    words = tl.load(Bits + bh.to(tl.int64) * N * words_per_row + rows[None, :] * words_per_row + w[:, None],
                    mask=(rows[None, :] < N) & (w[:, None] < words_per_row), other=0)
    bit = tl.full([32], 1, tl.int32) << tl.arange(0, 32)
    return tl.reshape((words[:, None, :] & bit[None, :, None]) != 0, [BLOCK_K, BLOCK_Q])


def dropout_threshold(dropout_p: float) -> int:
    """The kernels drop a probability when its random byte is below this: dropout_p rounded to a multiple of 1/256
    (at most 255/256). The drop rate is threshold / 256; kept values are still scaled by 1 / (1 - dropout_p)."""
    return min(255, round(dropout_p * 256))


@functools.lru_cache(maxsize=None)
def _no_bits(device: torch.device) -> torch.Tensor:
    """The Bits argument when there is no dropout: never read, but must be a pointer (cached: no allocation per
    call)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


BITS_BLOCK_M, BITS_BLOCK_N = 32, 128


def _dropout_bits(seed: torch.Tensor, B: int, H: int, N: int, dropout_p: float, device) -> tuple[torch.Tensor, int]:
    """(bits (B*H, N, ceil(N/32)) int32, words per row): the keep mask of every (b, h, query, key), one bit per key,
    drawn by _dropout_bits_kernel; the attention kernels read these bits instead of drawing Philox numbers."""
    if dropout_p == 0:
        return _no_bits(torch.device(device)), 0
    if seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(f"dropout needs an int64 seed tensor of one element, got {seed.dtype} {tuple(seed.shape)}")
    words = triton.cdiv(N, 32)
    bits = torch.empty(B * H, N, words, dtype=torch.int32, device=device)
    _dropout_bits_kernel[(B * H * triton.cdiv(N, BITS_BLOCK_M),)](
        bits, seed.to(device=device), N, words, dropout_threshold(dropout_p), BLOCK_M=BITS_BLOCK_M,
        BLOCK_N=BITS_BLOCK_N, num_warps=4,
    )
    return bits, words


def dropout_mask(seed: torch.Tensor, B: int, H: int, N: int, dropout_p: float, device) -> torch.Tensor:
    """The (B, H, N, N) bool keep mask the kernels use for `seed` (int64, (1,)) and dropout_p > 0: True = kept.
    Unpacks the same bits the kernels read. Materialises N*N per head: for tests and small shapes only."""
    bits, _ = _dropout_bits(seed.to(dtype=torch.int64), B, H, N, dropout_p, device)
    keys = torch.arange(N, device=device)
    mask = (bits[:, :, keys // 32] >> (keys % 32).to(torch.int32)) & 1
    return mask.view(B, H, N, N).bool()

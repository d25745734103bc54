"""Attention-probability dropout for the Triton attention kernels: the keep mask as bits, drawn once per pass.

_dropout_bits_kernel draws keep(b, h, query i, key j) for every score (Philox4x32-7 keyed on the int64 seed, one
call per (16 keys, query, b*H + h) counter, one byte per key, kept when the byte >= dropout_threshold(p) =
round(256 p): the drop rate is p rounded to a multiple of 1/256, at most 255/256; kept values are scaled by
1 / (1 - p), as in flash-attention 2) and stores it twice as bits: query-major (a row per query, packed over keys;
read by the forward and dQ kernels) and key-major (a row per key, packed over queries; read by the dK/dV kernel,
whose score tiles are transposed). dropout_mask() unpacks the query-major bits, so tests compare against exactly
the kernels' mask.

Packing (lane order): along a row, each 128 columns fill 4 int32 words; column c goes to word 4 (c // 128) +
(c % 8) // 2, bit 2 ((c % 128) // 8) + c % 2. That is the order of a tensor-core accumulator tile: the thread of
lane l % 4 holds columns 8g + 2 (l % 4) + {0, 1}, so its 2 x (BLOCK / 8) keep flags of a row lie in one word and
each flag is one AND with a constant (no layout conversion; see benchmarks/NOTES.md for the SASS counts). Rows
are padded to a multiple of 128 so that the kernels load words without masks.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from cct_kernels.triton._common import cdiv

_PHILOX_ROUNDS = tl.constexpr(7)  # Philox4x32-7 passes BigCrush (Salmon et al., 2011); 10 rounds would cost 40% more ALU.
_KEYS_PER_DRAW = tl.constexpr(16)  # 128 random bits per Philox call, one byte per key
SPAN = 128  # columns packed into one group of 4 words (and the row padding)
_SPAN = tl.constexpr(SPAN)


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
def _pack_rows(keep, ROWS: tl.constexpr):
    """(ROWS, SPAN) flags -> (ROWS, 4) words, each row packed in lane order (see the module docstring)."""
    flags = tl.reshape(keep.to(tl.int32), [ROWS, _SPAN // 8, 4, 2])  # column 8g + 2q + e -> (g, q, e)
    bit = 1 << (2 * tl.arange(0, _SPAN // 8)[:, None] + tl.arange(0, 2)[None, :])  # bit 2g + e
    flags = tl.permute(flags * bit[None, :, None, :], [0, 2, 1, 3])
    return tl.reduce(tl.reshape(flags, [ROWS, 4, _SPAN // 4]), 2, _bitwise_or)


@triton.jit
def _pack_columns(keep, COLUMNS: tl.constexpr):
    """(SPAN, COLUMNS) flags -> (COLUMNS, 4) words, each column packed in lane order: the packing of the
    transposed tile without transposing it (only the small word tile is)."""
    flags = tl.reshape(keep.to(tl.int32), [_SPAN // 8, 4, 2, COLUMNS])  # row 8g + 2q + e -> (g, q, e)
    bit = 1 << (2 * tl.arange(0, _SPAN // 8)[:, None] + tl.arange(0, 2)[None, :])
    flags = tl.permute(flags * bit[:, None, :, None], [1, 3, 0, 2])
    return tl.trans(tl.reduce(tl.reshape(flags, [4, COLUMNS, _SPAN // 4]), 2, _bitwise_or))


@triton.jit
def _dropout_bits_kernel(Bits, BitsT, Seed, N, threshold, KEY_MAJOR: tl.constexpr):
    """Bits and BitsT (B*H, R, W) int32, R = N rounded up to SPAN, W = 4 * R / SPAN: the keep flags of head
    program_id(0) // blocks for queries x keys (Bits) and, if KEY_MAJOR, keys x queries (BitsT), packed in lane
    order. One program: SPAN queries (block program_id(0) % blocks), all keys in steps of SPAN (1-D grid: no
    65535 limit on B*H)."""
    blocks = tl.cdiv(N, _SPAN)
    bh = tl.program_id(0) // blocks
    row0 = (tl.program_id(0) % blocks) * _SPAN
    rows_padded = blocks * _SPAN
    words_per_row = 4 * blocks
    seed = tl.load(Seed)
    offs = tl.arange(0, _SPAN)
    w = tl.arange(0, 4)
    base = bh.to(tl.int64) * rows_padded * words_per_row
    for start in range(0, N, _SPAN):
        keep = _dropout_keep(seed, bh, row0, start, threshold, _SPAN, _SPAN)
        tl.store(Bits + base + (row0 + offs)[:, None] * words_per_row + (w + start // _SPAN * 4)[None, :],
                 _pack_rows(keep, _SPAN))
        if KEY_MAJOR:
            tl.store(BitsT + base + (start + offs)[:, None] * words_per_row + (w + row0 // _SPAN * 4)[None, :],
                     _pack_columns(keep, _SPAN))


@triton.jit
def _kept(Bits, bh, rows, col0, N, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_R, BLOCK_C) keep flags of rows `rows` (all below N rounded up to SPAN) and columns col0 ..
    col0 + BLOCK_C - 1 (BLOCK_C a power of two from 8 to SPAN, col0 a multiple of it), read from lane-order bits
    (Bits: rows are queries; BitsT: rows are keys). One word per row and lane: no masks, no layout conversion."""
    words_per_row = 4 * tl.cdiv(N, _SPAN)
    w = tl.arange(0, 4) + col0 // _SPAN * 4
    words = tl.load(Bits + bh.to(tl.int64) * tl.cdiv(N, _SPAN) * _SPAN * words_per_row
                    + rows[:, None] * words_per_row + w[None, :])
    if BLOCK_C < _SPAN:
        words = words >> ((col0 - col0 // _SPAN * _SPAN) // 4)  # this block's flags to the low bits (col0 % SPAN / 4)
    bit = 1 << (2 * tl.arange(0, BLOCK_C // 8)[:, None] + tl.arange(0, 2)[None, :])  # (g, e) -> bit 2g + e
    keep = (words[:, None, :, None] & bit[None, :, None, :]) != 0  # (row, g, lane q, e)
    return tl.reshape(keep, [BLOCK_R, BLOCK_C])


def dropout_threshold(dropout_p: float) -> int:
    """The kernels drop a probability when its random byte is below this: dropout_p rounded to a multiple of 1/256
    (at most 255/256). The drop rate is threshold / 256; kept values are still scaled by 1 / (1 - dropout_p)."""
    return min(255, round(dropout_p * 256))


@functools.lru_cache(maxsize=None)
def _no_bits(device: torch.device) -> torch.Tensor:
    """The Bits arguments when there is no dropout: never read, but must be a pointer (cached: no allocation per
    call)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _dropout_bits(seed: torch.Tensor, B: int, H: int, N: int, dropout_p: float, device,
                  key_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(bits, bits_t), each (B*H, R, 4 R / SPAN) int32 with R = N rounded up to SPAN: the keep mask of every
    (b, h, query, key), query-major and (if key_major, else a placeholder) key-major (see the module docstring),
    drawn by _dropout_bits_kernel."""
    if dropout_p == 0:
        return _no_bits(torch.device(device)), _no_bits(torch.device(device))
    if seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(f"dropout needs an int64 seed tensor of one element, got {seed.dtype} {tuple(seed.shape)}")
    blocks = cdiv(N, SPAN)
    bits = torch.empty(1 + key_major, B * H, blocks * SPAN, 4 * blocks, dtype=torch.int32, device=device)
    _dropout_bits_kernel[(blocks * B * H,)](bits[0], bits[-1], seed.to(device=device), N, dropout_threshold(dropout_p),
                                          KEY_MAJOR=key_major, num_warps=8)
    return bits[0], bits[1] if key_major else _no_bits(torch.device(device))


def unpack(bits: torch.Tensor, N: int) -> torch.Tensor:
    """(B*H, N, N) bool flags of rows and columns below N from lane-order bits (either orientation)."""
    c = torch.arange(N, device=bits.device)
    word = c // SPAN * 4 + c % 8 // 2
    shift = (2 * (c % SPAN // 8) + c % 2).to(torch.int32)
    return ((bits[:, :N, word] >> shift) & 1).bool()


def dropout_mask(seed: torch.Tensor, B: int, H: int, N: int, dropout_p: float, device) -> torch.Tensor:
    """The (B, H, N, N) bool keep mask the kernels use for `seed` (int64, (1,)) and dropout_p > 0: True = kept.
    Unpacks the same bits the kernels read. Materialises N*N per head: for tests and small shapes only."""
    bits, _ = _dropout_bits(seed.to(dtype=torch.int64), B, H, N, dropout_p, device)
    return unpack(bits, N).view(B, H, N, N)

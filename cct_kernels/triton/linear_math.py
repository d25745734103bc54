"""The element-wise and row-wise math of the Triton linear kernels: the exact GELU and its derivative (forward
epilogue, backward prologues), dropout's keep mask, and the tile loads.

Dropout: the mask of cct_kernels.reference.linear_dropout_mask, hashed in registers where a tile needs it (the
forward's epilogue, the backward's grad_h prologues), never stored. The hash is the lowbias32 integer mix on uint32
values, as csrc/cpu/common.h's mix32 and dropout_key: element (r, c) is kept iff mix32(key(seed, r) ^ mix32(c)) >> 8
>= threshold (24-bit). Per tile that is one mix per row and per column and one per element: about 11 integer
instructions per element.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

_RSQRT2 = tl.constexpr(0.7071067811865476)
_RSQRT_2PI = tl.constexpr(0.3989422804014327)
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
_NEG_HALF_LOG2E = tl.constexpr(-0.5 * 1.4426950408889634)
# Abramowitz & Stegun 7.1.26 for erfc(x) / 2: p times 1 / sqrt 2 (the polynomial takes h, not x = h / sqrt 2),
# the a_i halved (the tail of the normal is half of erfc)
_AS_P = tl.constexpr(0.3275911 * 0.7071067811865476)
_AS_A1, _AS_A2, _AS_A3 = tl.constexpr(0.254829592 / 2), tl.constexpr(-0.284496736 / 2), tl.constexpr(1.421413741 / 2)
_AS_A4, _AS_A5 = tl.constexpr(-1.453152027 / 2), tl.constexpr(1.061405429 / 2)


@triton.jit
def _normal_tail(h):
    """(Phi(-|h|), exp(-h^2 / 2)): the normal tail erfc(|h| / sqrt 2) / 2 by Abramowitz-Stegun 7.1.26, one
    polynomial in t = 1 / (1 + p |h| / sqrt 2) times that exp (|error| <= 1.5e-7 on erf). libdevice's erf picks one
    of two polynomials per element (about 35 instructions on sm_90 against about 15 here)."""
    e = tl.math.exp2(h * h * _NEG_HALF_LOG2E)
    t = _reciprocal(1.0 + _AS_P * tl.abs(h))
    return (t * e) * (_AS_A1 + t * (_AS_A2 + t * (_AS_A3 + t * (_AS_A4 + t * _AS_A5)))), e


@triton.jit
def gelu_erf(h, EXACT_ERF: tl.constexpr):
    """h * Phi(h): with libdevice's erf when EXACT_ERF (float32 outputs), else with _normal_tail, whose error
    (<= 7.5e-8 |h|) is far below a 16-bit output's rounding."""
    if EXACT_ERF:
        return 0.5 * h * (1.0 + tl.math.erf(h * _RSQRT2))
    tail, _ = _normal_tail(h)
    return h * tl.where(h >= 0, 1.0 - tail, tail)


@triton.jit
def gelu_erf_grad(h):
    """GELU'(h) = Phi(h) + h phi(h), with _normal_tail (3.0e-7 worst error over all float32 h, against 1.4e-7
    for float32 libdevice erf; the backward's inner loops run it per element of grad_h, so the fast form halves
    them)."""
    tail, e = _normal_tail(h)
    return tl.where(h >= 0, 1.0 - tail, tail) + (h * _RSQRT_2PI) * e


@triton.jit
def _reciprocal(d):
    """1 / d for d >= 1: one MUFU.RCP on the GPU (rcp.approx.ftz, 1 ulp); '/' would add the range fix-ups of
    div.full (seven instructions per element). The interpreter, which runs no PTX, divides."""
    if _INTERPRETED:
        return 1.0 / d
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [d], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _mix32(x):
    """lowbias32 (Wellons) on uint32: multiplications wrap modulo 2**32, shifts are logical."""
    x ^= x >> 16
    x *= tl.full([], 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x *= tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def seed_key(seed_ptr):
    """The seed's part of every row key: mix32(lo ^ 0x85EBCA6B) ^ mix32(hi + 0x27D4EB2F) of the int64 at seed_ptr."""
    seed = tl.load(seed_ptr)
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return _mix32(lo ^ tl.full([], 0x85EBCA6B, tl.uint32)) ^ _mix32(hi + tl.full([], 0x27D4EB2F, tl.uint32))


@triton.jit
def kept(key0, rows, cols, threshold):
    """(len(rows), len(cols)) bool: whether element (r, c) survives dropout, for row and column indices (any
    integer type, below 2**32) and key0 = seed_key(seed_ptr)."""
    row_keys = _mix32(key0 ^ _mix32(rows.to(tl.uint32) + tl.full([], 0x9E3779B9, tl.uint32)))
    bits = _mix32(row_keys[:, None] ^ _mix32(cols.to(tl.uint32))[None, :]) >> 8
    return bits >= threshold.to(tl.uint32)


@triton.jit
def load_tile(ptrs, mask, EVEN: tl.constexpr, UPCAST: tl.constexpr):
    """A tile; masked (0 outside) unless EVEN (the launcher knows the tile is whole); float32 when UPCAST."""
    if EVEN:
        t = tl.load(ptrs)
    else:
        t = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t

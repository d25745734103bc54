"""Tile configurations of the Triton linear kernels (cct_kernels/triton/linear.py), and grad_W's split of M."""
from __future__ import annotations

import functools

import torch

from cct_kernels.triton._common import META_SM_COUNT, cdiv, next_power_of_2, sm_count

# grad_W's split of M: at least this many rows per chunk, so the float32 partials (N*K*4 bytes per chunk) stay
# small beside the chunk's reads (MIN_CHUNK_ROWS * (2N + K) * 2 bytes in 16-bit).
MIN_CHUNK_ROWS = 512

# kernel -> (output row block, output column block, reduction block, num_warps, num_stages) for 16-bit inputs and
# for float32. forward: (M, N, K); grad_x: (M, K, N); grad_w computes grad_W^T: (K, N, M).
# 16-bit forward: 128x128 tiles of 8 warps (two warpgroups of 64x128 wgmma), 64-deep steps, 3 cp.async stages.
# The backward kernels make grad_h = GELU'(h) * grad_out in registers (about 23 instructions per element on
# sm_90), once per output tile that reads it: their tiles span K = 256 (CCT-7's D) so that each element is made
# once per kernel, and the GELU' work (~1500 issue cycles per 128x64 step of grad_x) stays near the tensor cores'
# (~1000 for the 128x256x64 wgmma). float32 (FMA or TF32): 64x64x32 tiles of 4 warps. All from the sm_90 static
# figures: no spills (registers 167-208 at D=256; see linear._sm90_check and benchmarks/NOTES.md).
_CONFIGS = {
    ("forward", False): (128, 128, 64, 8, 3),
    ("grad_x", False): (128, 256, 64, 8, 2),
    ("grad_w", False): (256, 64, 64, 8, 3),
    ("forward", True): (64, 64, 32, 4, 2),
    ("grad_x", True): (64, 64, 32, 4, 2),
    ("grad_w", True): (64, 64, 32, 8, 2),  # 4 warps spill 1444 bytes (FMA)
}


def _fit(block: int, size: int) -> int:
    """block cut to size rounded up to a power of two, at least 16 (tl.dot's smallest)."""
    return min(block, max(16, next_power_of_2(size)))


@functools.cache  # called per launch; a few distinct shapes per model
def config(kind: str, dtype: torch.dtype, rows: int, cols: int, red: int) -> tuple[int, int, int, int, int]:
    """The table's entry with each block cut to its dimension. A 16-bit output-tiled kernel (forward, grad_x)
    whose 128-row tiles would fill less than half of an H100 (small batches: M = 256 at batch 1) takes 64x128
    tiles of one warpgroup, for more programs (64x256 would hold 241-254 registers). The LayerNorm epilogue's
    forward ("forward_norm") spans whole rows: the column block is N rounded up to a power of two, of 64 rows (the
    smallest wgmma tile of a warpgroup) up to N = 256 and 32 rows beyond (mma.sync: 64 x 512 tiles spilled at 8
    warps, 255 registers, and at 16 warps, capped at 128; 32 x 512 holds 162 registers, no spills)."""
    if kind == "forward_norm":
        block_c = max(16, next_power_of_2(cols))
        block_r = _fit(64 if block_c <= 256 else 32, rows)
        block_red = _CONFIGS["forward", dtype == torch.float32][2]
        return block_r, block_c, _fit(block_red, red), 8, 2
    block_r, block_c, block_red, num_warps, num_stages = _CONFIGS[kind, dtype == torch.float32]
    block_r, block_c, block_red = _fit(block_r, rows), _fit(block_c, cols), _fit(block_red, red)
    tiles = cdiv(rows, 128) * cdiv(cols, block_c)
    if kind != "grad_w" and block_r == 128 and tiles < META_SM_COUNT // 2:
        block_r, block_c, num_warps = 64, min(block_c, 128), 4
    return block_r, block_c, block_red, num_warps, num_stages


def programs_wanted(device: torch.device) -> int:
    """Programs that fill the device once: its SMs (an H100's for the meta tensors of the sm_90 check), a few on
    the CPU interpreter (so small tests still split M)."""
    return sm_count(device) or 4


def split_rows(M: int, block_m: int, tiles: int, NK: int, device: torch.device, min_chunk: int) -> tuple[int, int]:
    """(SPLIT, CHUNK) of grad_W's M: SPLIT * tiles programs about fill the device, chunks of at least min_chunk
    rows (rounded to block_m) and SPLIT * N * K < 2**31 (int32 workspace offsets)."""
    blocks = cdiv(M, block_m)
    split = min(cdiv(programs_wanted(device), tiles), cdiv(M, min_chunk), (2**31 - 1) // NK)
    chunk = cdiv(blocks, max(1, min(split, blocks))) * block_m
    return cdiv(M, chunk), chunk

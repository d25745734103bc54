"""Launcher helpers shared by the Triton op modules."""
from __future__ import annotations

import contextlib
import functools
import os

import torch

META_SM_COUNT = 132  # H100 SXM / H200: the SMs launches on meta tensors plan for (the sm_90 static checks)


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b) for launch grids and tile counts: triton.cdiv is a constexpr function whose Python
    call costs ~1.6 µs (about 20 such calls per linear forward and backward)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Host-side triton.next_power_of_2 (the same values, 0 for 0) without its constexpr-call cost."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@functools.cache
def sm_count(device: torch.device) -> int | None:
    """The streaming multiprocessors a launch on `device` fills: the GPU's own, an H100's / H200's for meta tensors
    (sm90.py compiles launches made on them), None on the CPU interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return META_SM_COUNT if device.type == "meta" else None


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: float32 inputs follow torch.backends.cuda.matmul.allow_tf32, read at each call (TF32 tensor
    cores when allowed, exact 'ieee' FMA products otherwise); 16-bit inputs always use tensor cores."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def upcast_bfloat16(dtype: torch.dtype) -> bool:
    """Whether kernels must widen loaded bfloat16 to float32: the interpreter computes bfloat16 arithmetic wrongly."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def tf32_matmul(enabled: bool):
    """torch.backends.cuda.matmul.allow_tf32 = enabled inside the block (the sm_90 checks compile both settings)."""
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed

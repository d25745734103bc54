"""Input checks shared by the ops: each failure names the argument, what was expected and what was given."""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch


def check_tensor(name: str, t, *, ndim: int | None = None, like: torch.Tensor | None = None, like_name: str = "x"):
    """`t` is a floating-point tensor of rank `ndim`, with the dtype and device of `like` when given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16 or bfloat16), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {like_name} has dtype {like.dtype}; they must match")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}; they must match")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_int(name: str, value, minimum: int) -> None:
    """`value` is an int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_real(name: str, value, allowed: str, ok) -> float:
    """`value` is a real number (not a bool) for which ok(value) holds; `allowed` says which values are."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number ({allowed}), got {type(value).__name__} {value!r}")
    value = float(value)
    if not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def is_positive_finite(value: float) -> bool:
    return math.isfinite(value) and value > 0


def autocast_inputs(*tensors):
    """Under torch.autocast the op computes in the autocast dtype, like the conv/matmuls it replaces would."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)



def no_host_sync() -> bool:
    """Under torch.compile (a data-dependent branch breaks the graph) or a CUDA graph capture (a sync is illegal)."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_values_in_range(name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Every value of integer tensor `t` lies in [low, high) (ValueError naming the values otherwise). Under
    torch.compile or a CUDA graph capture the test is an asynchronous assert (no host sync, no graph break); it
    raises a RuntimeError with the same text."""
    if t.numel() == 0:
        return
    if no_host_sync():
        torch._assert_async(((t >= low) & (t < high)).all(), f"{name} must lie in [{low}, {high})")
    elif int(t.min()) < low or int(t.max()) >= high:
        raise ValueError(f"{name} must lie in [{low}, {high}), got values from {int(t.min())} to {int(t.max())}")


NOT_A_PREFIX = ("the kernels take key padding as lengths; this bool mask is not a prefix of every sequence (or is "
                "not known to be one: under torch.compile a bool mask is not inspected; pass lengths)")


class KeyPadding(NamedTuple):
    """A key-padding mask in the two forms the backends take: `lengths` (B,) int64 for the kernels (None when the
    mask is not a prefix of every sequence) and `mask` (B, N) bool for the eager reference."""

    lengths: torch.Tensor | None
    mask: torch.Tensor


def key_padding(mask, batch: int, length: int, device: torch.device) -> KeyPadding | None:
    """Check a user's key-padding mask: None (every token real), a (B, N) bool tensor (True = real token), or a
    (B,) integer tensor of lengths (the first lengths[b] tokens of sequence b are real; 0 <= lengths[b] <= N).

    A bool mask that keeps a prefix of each sequence (padding at the end, the usual case) is also given as
    lengths, so the kernels can serve it; testing that costs one host sync for a CUDA mask, and under
    torch.compile or a CUDA graph capture it is not tested (no_host_sync): the mask is served as given, by eager.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a (B, N) bool tensor or (B,) integer lengths, got {type(mask).__name__}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the input is on {device}; they must match")
    positions = torch.arange(length, device=device)
    if mask.dtype == torch.bool:
        check_shape("mask", mask, (batch, length))
        if no_host_sync():
            return KeyPadding(None, mask)
        lengths = mask.sum(1)
        prefix = bool(torch.equal(mask, positions[None, :] < lengths[:, None]))
        return KeyPadding(lengths if prefix else None, mask)
    if mask.is_floating_point() or mask.is_complex() or mask.dim() != 1:
        raise TypeError(f"mask must be a (B, N) bool tensor or (B,) integer lengths, got {mask.dtype} "
                        f"of shape {tuple(mask.shape)}")
    check_shape("mask (lengths)", mask, (batch,))
    check_values_in_range("mask lengths", mask, 0, length + 1)
    lengths = mask.to(torch.int64).contiguous()
    return KeyPadding(lengths, positions[None, :] < lengths[:, None])

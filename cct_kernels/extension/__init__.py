"""Python side of the C++/CUDA extension `cct_kernels._C` (the "cpu" and "cuda" backends).

The per-op modules beside this file adapt the extension's ops to the kernel-module interface of
cct_kernels.backends. This file only answers whether the extension was built and for which devices.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def load_error() -> str | None:
    """None when cct_kernels._C imports, else why it does not."""
    try:
        from cct_kernels import _C  # noqa: F401
    except ImportError as e:
        return f"the C++ extension cct_kernels._C is not built ({e}); reinstall with a compiler present"
    return None


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    error = load_error()
    if error is not None:
        return error
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, got a {device.type} tensor"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
        if not torch.ops.cct_kernels_C.built_with_cuda():
            return "the extension was built without CUDA (no nvcc or a CPU-only torch at build time)"
    return None

"""Python side of the C++/CUDA extension `cct_kernels._C` (the "cpu" and "cuda" backends).

The per-op modules beside this file (seqpool, attention, tokenize) adapt the extension's ops
(torch.ops.cct_kernels_C.*, registered by csrc/ops.cpp) to the kernel-module interface of cct_kernels.backends.
This file loads the extension and answers whether it was built, for which devices, and how (`info()`).

Loading: the compiled module of the installation (`pip install --no-build-isolation`, built ahead of time) when it
is there; else the first-use build of `build.build_and_load` (compiled once per torch version into
~/.cache/cct_kernels, then reused), which is what a plain `pip install .` gets. CCT_KERNELS_NO_BUILD=1 turns the
first-use build off (the "cpu"/"cuda" backends then report the extension as not built).
"""
from __future__ import annotations

import functools
import importlib

import torch

from cct_kernels.extension import build

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def load_error() -> str | None:
    """None when the extension is loaded (installed, or built at first use), else why it is not."""
    try:
        importlib.import_module("cct_kernels._C")
        return None
    except ImportError as e:
        not_installed = f"cct_kernels._C is not in the installation ({e})"
    if build.env_flag("CCT_KERNELS_NO_BUILD"):
        return (f"the C++ extension is not built: {not_installed}, and CCT_KERNELS_NO_BUILD=1 turns the first-use "
                f"build off")
    try:
        build.build_and_load()
    except build.BuildError as e:
        return (f"the C++ extension is not built: {not_installed}, and the first-use build failed: {e}. Fix the "
                f"compiler and run again, or install with `pip install --no-build-isolation .` (README, Install)")
    return None


def ops():
    """torch.ops.cct_kernels_C, after loading the extension (raises ImportError when it is not built)."""
    error = load_error()
    if error is not None:
        raise ImportError(error)
    return torch.ops.cct_kernels_C


def unavailable_reason(backend: str) -> str | None:
    """Why backend "cpu" or "cuda" cannot run at all (None when it can); cct_kernels.backends checks devices."""
    error = load_error()
    if error is not None:
        return error
    if backend == "cuda" and not torch.ops.cct_kernels_C.built_with_cuda():
        return "the extension was built without CUDA (no nvcc or a CPU-only torch at build time)"
    return None


def dtype_reason(dtype: torch.dtype, allowed=FLOAT_DTYPES) -> str | None:
    if dtype not in allowed:
        return f"dtype {dtype} is not supported (supported: {', '.join(str(d) for d in allowed)})"
    return None


def info() -> dict:
    """What was built: {'built': bool, 'cpu': bool, 'cuda': bool, 'detail': str} ('detail' says why not if not)."""
    error = load_error()
    if error is not None:
        return {"built": False, "cpu": False, "cuda": False, "detail": error}
    built_cuda = bool(torch.ops.cct_kernels_C.built_with_cuda())
    return {"built": True, "cpu": True, "cuda": built_cuda, "detail": torch.ops.cct_kernels_C.build_info()}


def describe() -> str:
    """`info()` as text, for `cct-kernels info`."""
    i = info()
    if not i["built"]:
        return i["detail"]
    return f"built: cpu kernels yes, cuda kernels {'yes' if i['cuda'] else 'no'} ({i['detail']})"


def output_cache_stats() -> dict:
    """The CPU kernels' output cache (csrc/cpu/output_cache.h): blocks of 64 KiB and more that the kernels' outputs
    used stay mapped after those tensors die and serve the next output of about their size (GEMMs into fresh pages
    ran ~1.7x slower on our 2-core VM). torch.profiler's memory events include these tensors.
    CCT_KERNELS_CPU_CACHE_MB caps the free bytes kept (default 2048, 0: off).

    -> {'live_bytes': held by live tensors, 'free_bytes': kept for reuse, 'hits': outputs served from the free
    blocks, 'misses': outputs that allocated}. Raises ImportError when the extension is not built."""
    live, free, hits, misses = ops().output_cache_stats()
    return {"live_bytes": live, "free_bytes": free, "hits": hits, "misses": misses}


def release_output_cache() -> None:
    """Returns the cache's free blocks to the system (live tensors keep theirs until they die)."""
    ops().output_cache_release()

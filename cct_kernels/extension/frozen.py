"""Weights frozen for inference on the "cpu" backend (csrc/cpu/frozen_weights.h); cct_kernels.freeze is the model-level
entry point.

A frozen weight is kept in the form the CPU kernel reads instead of being converted on every call: a float32 linear
weight (N, K) as MKL's packed GEMM operand, one copy per row count (made at the first product with that many rows,
at most 4096; the latest four kept: MKL's packed format depends on it), a 4-D convolution weight as its
channels-last copy. The copies live while the weight's storage does and are remade when the weight's version
counter moves (an optimizer step, load_state_dict, any in-place op); writes through `.data` bypass that counter and
need freezing again. Other backends and devices ignore them.
"""
from __future__ import annotations

from typing import Iterable

import torch

from cct_kernels import extension


def has_packed_gemm() -> bool:
    """Whether this torch exports MKL's packed GEMM (x86-64 wheels): without it, linear weights are not frozen."""
    return bool(extension.ops().cpu_has_packed_gemm())


def freeze(weights: Iterable[torch.Tensor]) -> int:
    """Keeps each weight's frozen form; returns how many have one (CPU weights: 4-D, or 2-D float32 with the packed
    GEMM). Raises ValueError for a weight that is not 2-D or 4-D, or an inference tensor (made under
    torch.inference_mode: no version counter to tell its updates); ImportError when the extension is not built."""
    ops, count = extension.ops(), 0
    for w in weights:
        if w.dim() not in (2, 4):
            raise ValueError(f"freeze: a linear (2-D) or convolution (4-D) weight expected, got shape {tuple(w.shape)}")
        if w.is_inference():
            raise ValueError("freeze: an inference tensor (made under torch.inference_mode) has no version counter to "
                             "tell its updates; build the model outside inference_mode")
        count += bool(ops.freeze_weight(w.detach()))
    return count


def unfreeze(weights: Iterable[torch.Tensor]) -> None:
    """Drops the weights' frozen forms (no error for a weight without one)."""
    ops = extension.ops()
    for w in weights:
        ops.unfreeze_weight(w.detach())


def stats() -> dict:
    """{'weights': live frozen weights in this process (those of freed tensors are dropped), 'packed': packed copies
    of linear weights, one per weight and row count used}."""
    weights, packed = extension.ops().frozen_weight_stats()
    return {"weights": int(weights), "packed": int(packed)}

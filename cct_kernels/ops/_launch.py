"""How the registered custom ops call a kernel backend: on the tensors' device, with outputs in one fixed layout.

Every custom op implementation goes through run_kernel, so three rules hold for every kernel of every backend:
- Device: Triton and CUDA launches go to the *current* CUDA device, not the tensor's; run_kernel makes the tensor's
  device current for the call (a tensor on cuda:1 would otherwise be read from a cuda:0 launch).
- Layout: every output tensor is returned contiguous (row-major), or contiguous in the memory format the op names
  for it (the Triton tokenizer's channels-last NCHW output), which is what the fake implementations state.
  Kernels may return other layouts (the cpu tokenizer's direct path returns grad_weight as a transposed view, its
  1x1 no-pool token output is a permuted view); the copy costs nothing when the kernel already returns contiguous
  tensors, and torch.compile's stride assertions hold on every layout path.
- Double backward: the backward kernels have no derivative; asking for one raises an error that says to use
  backend="eager" (the reference is plain autograd, so it supports higher-order gradients).
"""
from __future__ import annotations

import contextlib

import torch

from cct_kernels import backends


def device_guard(device: torch.device):
    """Make `device` the current CUDA device for the enclosed launches (nothing to do for CPU tensors)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def run_kernel(backend: str, op: str, function: str, device: torch.device, *args, memory_formats=None):
    """kernel_module(backend, op).<function>(*args) on `device`, every output tensor contiguous (in its entry of
    memory_formats, one per output, when given)."""
    kernel = getattr(backends.kernel_module(backend, op), function)
    with device_guard(device):
        outputs = kernel(*args)
    if isinstance(outputs, torch.Tensor):
        return outputs.contiguous()
    formats = memory_formats or (torch.contiguous_format,) * len(outputs)
    return tuple(o.contiguous(memory_format=f) for o, f in zip(outputs, formats))


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def runs_directly(*tensors) -> bool:
    """Whether an op may call its forward implementation directly instead of through the registered custom op:
    no torch.compile trace, no gradient to record, and plain tensors only (fake, meta and subclass tensors need
    the op's fake implementation or dispatch). The custom op's dispatch costs about 20 µs a call, 1.3 ms of a
    CCT-7/3x1 forward at batch 1 on the cpu backend; the kernel and its outputs are the same either way."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) in _PLAIN_TENSORS and not (grad and t.requires_grad)) for t in tensors)


def new_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed drawn from torch's generator for `device` (so torch.manual_seed reproduces it)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def forbid_double_backward(backward_op, op: str) -> None:
    """Give the registered backward op `backward_op` a derivative that explains why there is none."""

    def no_double_backward(ctx, *grads):
        raise RuntimeError(
            f"double backward (a gradient of a gradient) through the {op} kernels is not supported; "
            f'run this op with backend="eager" (e.g. cct_kernels.use_backend("eager")) to differentiate twice'
        )

    backward_op.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)

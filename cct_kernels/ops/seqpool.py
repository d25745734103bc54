"""SeqPool: attention-weighted pooling of the token sequence (the CCT/CVT classifier head's input).

    seqpool(x, weight, bias) = softmax_n(x[b, n] . weight + bias)  weighted sum over n of x[b, n]

Shapes: x (B, N, D), weight (1, D), bias (1,) -> (B, D). Dtypes: float32, float16, bfloat16 (all three tensors the
same dtype; kernels accumulate in float32). Any B >= 0, N >= 1, D >= 1.

Kernel backends implement two registered ops (the kernel-module interface of cct_kernels.backends):
    forward(x, weight, bias) -> (out (B, D) x.dtype, lse (B,) float32: logsumexp over n of the scores)
    backward(grad_out, x, weight, bias, out, lse) -> (grad_x, grad_weight, grad_bias)

Errors (from seqpool's own checks, before any kernel runs):
    TypeError   x, weight or bias not a floating-point torch.Tensor, or dtypes that differ.
    ValueError  wrong rank or shape (weight must be (1, D), bias (1,)); N == 0; tensors on different devices;
                an unknown backend name.
    BackendUnavailable  an explicitly named backend cannot serve the call (the message says why).
    RuntimeError  double backward through a kernel backend (use backend="eager" for that).
"""
from __future__ import annotations

import torch

from cct_kernels import backends, reference
from cct_kernels.ops._checks import autocast_inputs, check_shape, check_tensor
from cct_kernels.ops._launch import forbid_double_backward, run_kernel

OP = "seqpool"


@torch.library.custom_op("cct_kernels::seqpool_forward", mutates_args=())
def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return run_kernel(backend, OP, "forward", x.device, x, weight, bias)


@_forward.register_fake
def _(x, weight, bias, backend):
    return x.new_empty(x.shape[0], x.shape[2]), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("cct_kernels::seqpool_backward", mutates_args=())
def _backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_kernel(backend, OP, "backward", x.device, grad_out, x, weight, bias, out, lse)


@_backward.register_fake
def _(grad_out, x, weight, bias, out, lse, backend):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, backend = inputs
    ctx.save_for_backward(x, weight, bias, *output)
    ctx.backend = backend


def _autograd_backward(ctx, grad_out, _grad_lse):
    x, weight, bias, out, lse = ctx.saved_tensors
    grads = _backward(grad_out.contiguous(), x, weight, bias, out, lse, ctx.backend)
    return (*grads, None)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
forbid_double_backward(_backward, OP)


def seqpool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Softmax-weighted sum over the sequence; see the module docstring for shapes, dtypes and limits."""
    check_tensor("x", x, ndim=3)
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_tensor("weight", weight, ndim=2, like=x)
    check_tensor("bias", bias, ndim=1, like=x)
    check_shape("weight", weight, (1, x.shape[2]))
    check_shape("bias", bias, (1,))
    if x.shape[1] == 0:
        raise ValueError(f"x must hold at least one token (N >= 1), got shape {tuple(x.shape)}")
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    name = backends.select(OP, backend, x.device, x, weight, bias)
    if name == "eager":
        return reference.seqpool(x, weight, bias)
    return _forward(x, weight, bias, name)[0]

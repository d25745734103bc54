"""SeqPool: attention-weighted pooling of the token sequence (the CCT/CVT classifier head's input).

    seqpool(x, weight, bias) = softmax_n(x[b, n] . weight + bias)  weighted sum over n of x[b, n]

Shapes: x (B, N, D), weight (1, D), bias (1,) -> (B, D). Dtypes: float32, float16, bfloat16 (all three tensors the
same dtype; kernels accumulate in float32). Any B >= 0, N >= 1, D >= 1.
mask: for text models, a (B, N) bool tensor (True = real token) or (B,) integer lengths; the softmax runs over
real tokens only, and a sequence with none gives zeros. The kernels take lengths (every kernel backend serves
them, reading real tokens only); a bool mask that is not a prefix of each sequence runs on eager only, and under
torch.compile or a CUDA graph capture a bool mask is served as given by eager (pass lengths there).

Kernel backends implement two registered ops (the kernel-module interface of cct_kernels.backends):
    forward(x, weight, bias, lengths) -> (out (B, D) float32, lse (B,) float32: logsumexp over n of the scores)
    backward(grad_out (B, D) x.dtype, x, weight, bias, out (float32, the forward's), lse, lengths)
        -> (grad_x, grad_weight, grad_bias)
The forward's output stays float32 for the backward: the score gradients ds_n = p_n g.(x_n - out) are centred on
it, and only on the exact output do they sum to zero (centred on a float16/bfloat16 rounding of it, dx gained a
p_n g.(out_exact - out) w term, up to 6x eager's error). seqpool() returns it cast to x's dtype.
`lengths` (last, default None) is None or (B,) int64 key padding (see mask); unsupported(x, weight, bias, lengths)
declines what a kernel cannot serve.

Errors (from seqpool's own checks, before any kernel runs):
    TypeError   x, weight or bias not a floating-point torch.Tensor, or dtypes that differ; mask neither a bool
                tensor nor integer lengths.
    ValueError  wrong rank or shape (weight must be (1, D), bias (1,), mask (B, N) or (B,)); N == 0; tensors on
                different devices; lengths outside [0, N]; an unknown backend name.
    BackendUnavailable  an explicitly named backend cannot serve the call (the message says why).
    RuntimeError  double backward through a kernel backend (use backend="eager" for that).
"""
from __future__ import annotations

import torch

from cct_kernels import backends, reference
from cct_kernels.ops._checks import NOT_A_PREFIX, autocast_inputs, check_shape, check_tensor, key_padding
from cct_kernels.ops._launch import KernelOp, run_kernel

OP = "seqpool"


def _run_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backend: str, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    return run_kernel(backend, OP, "forward", x.device, x, weight, bias, lengths)


_forward = torch.library.custom_op("cct_kernels::seqpool_forward", _run_forward, mutates_args=())


@_forward.register_fake
def _(x, weight, bias, backend, lengths=None):
    return x.new_empty(x.shape[0], x.shape[2], dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.float32)


def _run_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, backend: str, lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_kernel(backend, OP, "backward", x.device, grad_out, x, weight, bias, out, lse, lengths)


_backward = torch.library.custom_op("cct_kernels::seqpool_backward", _run_backward, mutates_args=())


@_backward.register_fake
def _(grad_out, x, weight, bias, out, lse, backend, lengths=None):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, backend, lengths = inputs
    ctx.save_for_backward(x, weight, bias, lengths, *output)
    ctx.backend = backend


def _autograd_backward(ctx, grad_out, _grad_lse):
    x, weight, bias, lengths, out, lse = ctx.saved_tensors
    # grad_out arrives float32 through seqpool()'s cast; it was x.dtype before it, so casting back is exact
    grad_out = grad_out.to(x.dtype).contiguous()
    backward = KERNELS.backward_for(grad_out, x)
    grad_x, grad_weight, grad_bias = backward(grad_out, x, weight, bias, out, lse, ctx.backend, lengths)
    return grad_x, grad_weight, grad_bias, None, None


KERNELS = KernelOp(OP, _run_forward, _forward, _run_backward, _backward, _setup_context, _autograd_backward)


def seqpool(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
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
    padding = key_padding(mask, x.shape[0], x.shape[1], x.device)
    lengths = None if padding is None else padding.lengths
    eager_only = NOT_A_PREFIX if padding is not None and lengths is None else None
    name = backends.select(OP, backend, x.device, x, weight, bias, lengths, eager_only=eager_only)
    if name == "eager":
        return reference.seqpool(x, weight, bias, mask=None if padding is None else padding.mask)
    forward = KERNELS.forward_for(x, weight, bias)
    return forward(x, weight, bias, name, lengths)[0].to(x.dtype)

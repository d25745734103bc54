"""The text tokenizer stage: a convolution over the sequence whose kernel spans the whole word vector, optional ReLU,
optional max pool along the sequence, tokens out.

    text_tokenize(x, weight) = max_pool1d(relu(conv1d(x.transpose(1, 2), weight as (E, C, k)))).transpose(1, 2)

which is the official Conv2d(1, E, (k, C), stride (stride, 1), padding (padding, 0), bias=False) -> ReLU ->
MaxPool2d((pk, 1), (ps, 1), (pp, 0)) on x.unsqueeze(1) (text_cct; text_cvt/vit: relu=False, pool=None).

Shapes: x (B, L, C) word vectors, weight (E, 1, k, C) (the official Conv2d's) or (E, k, C). The conv output has
Lc = (L + 2*padding - k) // stride + 1 rows; with pool=(pk, ps, pp) the token count is N = (Lc + 2*pp - pk) // ps + 1
(else N = Lc). Returns (B, N, E) contiguous. The conv pads the sequence with zero rows; the pool pads with -inf
(as MaxPool2d), and a NaN in a window gives NaN (as the reference). Dtypes: float32, float16, bfloat16 (x and
weight the same; kernels accumulate in float32). Any B >= 0; C, E, k >= 1; N >= 1.
The token mask of text models is not this op's business: cct_kernels.nn.text.TextTokenizer computes it (the
official forward_mask) and multiplies it in.

Kernel backends implement two registered ops (the kernel-module interface of cct_kernels.backends); x, weight and
grad_out arrive contiguous, weight as (E, k, C):
    forward(x, weight, stride, padding, relu, pool_kernel, pool_stride, pool_padding)
        -> (out (B, N, E) x.dtype, pool_index: int8 (B, N, E), the offset 0..pk-1 of each token's maximum inside its
            pool window (the first maximum of the pre-ReLU conv; a NaN wins), or an empty (0,) tensor when
            pool_kernel == 0, which means no pooling)
    backward(grad_out, x, weight, out, pool_index, stride, padding, relu, pool_kernel, pool_stride, pool_padding,
             needs_input_grad)
        -> (grad_x (B, L, C), or an empty (0,) tensor when not needs_input_grad; grad_weight (E, k, C))
    unsupported(x, weight, stride, padding, relu, pool_kernel, pool_stride, pool_padding, *, backend)
        -> why a kernel cannot serve the call, or None
The backward routes each token's gradient to the conv row its pool_index names, where ReLU passed it (out not
<= 0, so a NaN output passes it, as torch's threshold_backward). Backends: "cpu" (csrc/cpu/text_tokenize.cpp),
"triton" (cct_kernels/triton/text_tokenize.py, which serves CUDA GPUs); "cuda" has no kernel of its own (auto on a
GPU takes triton; a request for "cuda" says so).

Errors (from text_tokenize's own checks, before any kernel runs):
    TypeError   x or weight not a floating-point torch.Tensor, or dtypes that differ; stride, padding or a pool
                entry not an int; relu not a bool; pool not None or a tuple/list.
    ValueError  x not 3-D; weight not (E, 1, k, C) or (E, k, C) with E, k >= 1 and C = x's last dim (C >= 1);
                stride < 1, padding < 0; pool not 3 entries (kernel >= 1, stride >= 1, 0 <= padding <= kernel / 2);
                a sequence too short for the convolution and pool (N < 1); tensors on different devices; an unknown
                backend name.
    BackendUnavailable  an explicitly named backend cannot serve the call (the message says why).
    RuntimeError  double backward through a kernel backend (use backend="eager" for that).
"""
from __future__ import annotations

import torch

from cct_kernels import backends, reference
from cct_kernels.ops._checks import autocast_inputs, check_bool, check_int, check_tensor
from cct_kernels.ops._launch import KernelOp, run_kernel
from cct_kernels.ops.tokenize import _pool_params, output_size

OP = "text_tokenize"


def output_length(length: int, kernel: int, stride: int, padding: int, pool_kernel: int, pool_stride: int,
                  pool_padding: int) -> int:
    """Tokens from a sequence of `length` word vectors (pool_kernel 0: no pool)."""
    length = output_size(length, kernel, stride, padding)
    return output_size(length, pool_kernel, pool_stride, pool_padding) if pool_kernel else length


def _run_forward(
    x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, relu: bool, pool_kernel: int, pool_stride: int,
    pool_padding: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return run_kernel(backend, OP, "forward", x.device, x, weight, stride, padding, relu, pool_kernel, pool_stride,
                      pool_padding)


_forward = torch.library.custom_op("cct_kernels::text_tokenize_forward", _run_forward, mutates_args=())


@_forward.register_fake
def _(x, weight, stride, padding, relu, pool_kernel, pool_stride, pool_padding, backend):
    n = output_length(x.shape[1], weight.shape[1], stride, padding, pool_kernel, pool_stride, pool_padding)
    shape = (x.shape[0], n, weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if pool_kernel else (0,), dtype=torch.int8)


def _run_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, pool_index: torch.Tensor,
    stride: int, padding: int, relu: bool, pool_kernel: int, pool_stride: int, pool_padding: int,
    needs_input_grad: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return run_kernel(backend, OP, "backward", x.device, grad_out, x, weight, out, pool_index, stride, padding, relu,
                      pool_kernel, pool_stride, pool_padding, needs_input_grad)


_backward = torch.library.custom_op("cct_kernels::text_tokenize_backward", _run_backward, mutates_args=())


@_backward.register_fake
def _(grad_out, x, weight, out, pool_index, stride, padding, relu, pool_kernel, pool_stride, pool_padding,
      needs_input_grad, backend):
    return x.new_empty(x.shape if needs_input_grad else (0,)), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, *params, backend = inputs
    ctx.save_for_backward(x, weight, *output)
    ctx.params, ctx.backend = params, backend


def _autograd_backward(ctx, grad_out, _grad_index):
    x, weight, out, pool_index = ctx.saved_tensors
    needs_input_grad = ctx.needs_input_grad[0]
    backward = KERNELS.backward_for(grad_out, x)
    grad_x, grad_weight = backward(grad_out.contiguous(), x, weight, out, pool_index, *ctx.params,
                                   needs_input_grad, ctx.backend)
    return (grad_x if needs_input_grad else None, grad_weight) + (None,) * (len(ctx.params) + 1)


KERNELS = KernelOp(OP, _run_forward, _forward, _run_backward, _backward, _setup_context, _autograd_backward)


def _check_weight(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight (E, 1, k, C) or (E, k, C) as (E, k, C)."""
    shape = tuple(weight.shape)
    if weight.dim() == 4 and shape[1] == 1:
        weight = weight.squeeze(1)
    if weight.dim() != 3 or min(weight.shape) == 0 or weight.shape[2] != x.shape[2] or x.shape[2] == 0:
        raise ValueError(f"weight must be (E, 1, k, C) or (E, k, C) with E, k >= 1 and C = x's last dim "
                         f"({x.shape[2]}, at least 1), got shape {shape}")
    return weight


def text_tokenize(
    x: torch.Tensor, weight: torch.Tensor, *, stride: int = 1, padding: int = 0, relu: bool = True,
    pool: tuple[int, int, int] | None = (3, 2, 1), backend: str | None = None,
) -> torch.Tensor:
    """Conv over the sequence -> ReLU -> max pool -> tokens (B, N, E); see the module docstring."""
    check_tensor("x", x, ndim=3)
    x, weight = autocast_inputs(x, weight)
    check_tensor("weight", weight, like=x)
    weight3 = _check_weight(weight, x)
    check_int("stride", stride, 1)
    check_int("padding", padding, 0)
    check_bool("relu", relu)
    pool_kernel, pool_stride, pool_padding = _pool_params(pool)
    kernel = weight3.shape[1]
    if output_length(x.shape[1], kernel, stride, padding, pool_kernel, pool_stride, pool_padding) < 1 or (
            pool_kernel and output_size(x.shape[1], kernel, stride, padding) < 1):
        raise ValueError(f"a sequence of {x.shape[1]} word vectors is too short for a kernel of {kernel} rows "
                         f"(stride {stride}, padding {padding}) and pool {pool}")
    x, weight3 = x.contiguous(), weight3.contiguous()
    params = (stride, padding, relu, pool_kernel, pool_stride, pool_padding)
    name = backends.select(OP, backend, x.device, x, weight3, *params)
    if name == "eager":
        return reference.text_tokenize(x, weight, stride=stride, padding=padding, relu=relu, pool=pool)
    forward = KERNELS.forward_for(x, weight3)
    return forward(x, weight3, *params, name)[0]

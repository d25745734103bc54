"""One convolutional tokenizer stage: conv2d -> ReLU -> max pool -> token layout, as one op.

    tokenize(x, weight) = flatten(maxpool(relu(conv2d(x, weight, bias, stride, padding)))).transpose(1, 2)

Shapes: x (B, C_in, H, W), weight (C_out, C_in, kh, kw), bias (C_out,) or None. The conv output is
Ho = (H + 2*padding - kh) // stride + 1 (likewise Wo); with pool=(k, s, p) the pooled size is (Ho + 2p - k) // s + 1.
Returns (B, Hp*Wp, C_out) in row-major token order if to_tokens, else (B, C_out, Hp, Wp): contiguous, except that
the triton and cpu backends return it channels-last (the layout the next stage's kernel reads, so a multi-stage
tokenizer never transposes its activation). x may come in either layout (NCHW or channels-last).
Dtypes: float32, float16, bfloat16, all tensors the same dtype. relu=False / pool=None drop those steps (the
ViT-Lite/CVT patch embedding is tokenize(x, w, b, stride=4, padding=0, relu=False, pool=None)).

Kernel backends implement two registered ops (the kernel-module interface of cct_kernels.backends):
    forward(x, weight, bias, stride, padding, relu, pool_kernel, pool_stride, pool_padding, to_tokens)
        -> (out, pool_index)   pool_index: int8, out's shape, the argmax's row-major offset kh*k+kw inside its
                                pool window (empty when pool_kernel == 0, which means no pooling)
    backward(grad_out, x, weight, bias, out, pool_index, stride, padding, relu, pool_kernel, pool_stride,
             pool_padding, to_tokens, needs_input_grad)
        -> (grad_x (empty when not needs_input_grad: the image stem's input needs none), grad_weight,
            grad_bias (empty when bias is None))
    Output layouts (what the fakes state; run_kernel makes each output contiguous in its format): see
    forward_memory_formats and grad_x_memory_format. grad_out may come in any layout.

Errors (from tokenize's own checks, before any kernel runs):
    TypeError   x, weight or bias not a floating-point torch.Tensor, or dtypes that differ; stride, padding or a
                pool entry not an int; relu or to_tokens not a bool; pool not None or a tuple/list.
    ValueError  wrong rank; zero input channels, output channels or kernel size; weight's input channels differ
                from x's; bias not (C_out,); stride < 1, padding < 0; pool not 3 entries (kernel >= 1, stride >= 1,
                0 <= padding <= kernel / 2); an input too small for the convolution and pool; tensors on different
                devices; an unknown backend name.
    BackendUnavailable  an explicitly named backend cannot serve the call (the message says why).
    RuntimeError  double backward through a kernel backend (use backend="eager" for that).
"""
from __future__ import annotations

import torch

from cct_kernels import backends, reference
from cct_kernels.ops._checks import autocast_inputs, check_bool, check_int, check_shape, check_tensor
from cct_kernels.ops._launch import KernelOp, run_kernel

OP = "tokenize"


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution or pooling window along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


def output_shape(x_shape, weight_shape, stride, padding, pool_kernel, pool_stride, pool_padding, to_tokens):
    B, _, H, W = x_shape
    C_out, _, kh, kw = weight_shape
    H, W = output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)
    if pool_kernel:
        H = output_size(H, pool_kernel, pool_stride, pool_padding)
        W = output_size(W, pool_kernel, pool_stride, pool_padding)
    return (B, H * W, C_out) if to_tokens else (B, C_out, H, W)


# Kernel backends whose (B, C_out, Hp, Wp) output (to_tokens=False) is channels-last, with grad_x in x's layout: the
# Triton kernel writes every output channel-fastest and reads channels-last x without a copy; the cpu epilogue
# writes channel-fastest, and oneDNN's convolutions run channels-last where that is faster (csrc/cpu/tokenize.cpp).
CHANNELS_LAST_BACKENDS = ("triton", "cpu")


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor stored channels-last (and not also row-major), else contiguous_format."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def forward_memory_formats(backend: str, pool_kernel: int, to_tokens: bool) -> tuple:
    """Memory formats of tokenize_forward's (out, pool_index) for this backend and layout path."""
    fmt = torch.channels_last if backend in CHANNELS_LAST_BACKENDS and not to_tokens else torch.contiguous_format
    return fmt, fmt if pool_kernel else torch.contiguous_format  # no pool: pool_index is empty, 1-D


def grad_x_memory_format(backend: str, x: torch.Tensor, needs_input_grad: bool) -> torch.memory_format:
    """Memory format of tokenize_backward's grad_x: x's own layout for CHANNELS_LAST_BACKENDS, else row-major."""
    return memory_format(x) if backend in CHANNELS_LAST_BACKENDS and needs_input_grad else torch.contiguous_format


def _run_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int, relu: bool,
    pool_kernel: int, pool_stride: int, pool_padding: int, to_tokens: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return run_kernel(
        backend, OP, "forward", x.device, x, weight, bias, stride, padding, relu, pool_kernel, pool_stride,
        pool_padding, to_tokens, memory_formats=forward_memory_formats(backend, pool_kernel, to_tokens),
    )


_forward = torch.library.custom_op("cct_kernels::tokenize_forward", _run_forward, mutates_args=())


@_forward.register_fake
def _(x, weight, bias, stride, padding, relu, pool_kernel, pool_stride, pool_padding, to_tokens, backend):
    shape = output_shape(x.shape, weight.shape, stride, padding, pool_kernel, pool_stride, pool_padding, to_tokens)
    index_shape = shape if pool_kernel else (0,)
    out_format, index_format = forward_memory_formats(backend, pool_kernel, to_tokens)
    return (torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=out_format),
            torch.empty(index_shape, dtype=torch.int8, device=x.device, memory_format=index_format))


def _run_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
    pool_index: torch.Tensor, stride: int, padding: int, relu: bool, pool_kernel: int, pool_stride: int,
    pool_padding: int, to_tokens: bool, needs_input_grad: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    formats = (grad_x_memory_format(backend, x, needs_input_grad), torch.contiguous_format, torch.contiguous_format)
    return run_kernel(
        backend, OP, "backward", x.device, grad_out, x, weight, bias, out, pool_index, stride, padding, relu,
        pool_kernel, pool_stride, pool_padding, to_tokens, needs_input_grad, memory_formats=formats,
    )


_backward = torch.library.custom_op("cct_kernels::tokenize_backward", _run_backward, mutates_args=())


@_backward.register_fake
def _(grad_out, x, weight, bias, out, pool_index, *args):
    needs_input_grad, backend = args[-2:]
    grad_x = (torch.empty(x.shape, dtype=x.dtype, device=x.device,
                          memory_format=grad_x_memory_format(backend, x, needs_input_grad))
              if needs_input_grad else x.new_empty(0))
    grad_bias = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return grad_x, weight.new_empty(weight.shape), grad_bias


def _setup_context(ctx, inputs, output):
    x, weight, bias, *params, backend = inputs
    ctx.save_for_backward(x, weight, bias, *output)
    ctx.params, ctx.backend = params, backend


def _autograd_backward(ctx, grad_out, _grad_index):
    x, weight, bias, out, pool_index = ctx.saved_tensors
    needs_input_grad = ctx.needs_input_grad[0]
    backward = KERNELS.backward_for(grad_out, x)
    grad_x, grad_weight, grad_bias = backward(
        grad_out, x, weight, bias, out, pool_index, *ctx.params, needs_input_grad, ctx.backend
    )
    return (grad_x if needs_input_grad else None, grad_weight, grad_bias if bias is not None else None) + (
        None,) * (len(ctx.params) + 1)


KERNELS = KernelOp(OP, _run_forward, _forward, _run_backward, _backward, _setup_context, _autograd_backward)


def _pool_params(pool) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a checked pool argument; (0, 1, 0) for no pooling."""
    if pool is None:
        return 0, 1, 0
    if not isinstance(pool, (tuple, list)):
        raise TypeError(f"pool must be None or a (kernel, stride, padding) tuple, got {type(pool).__name__} {pool!r}")
    if len(pool) != 3:
        raise ValueError(f"pool must be None or a (kernel, stride, padding) tuple of 3 ints, got {pool!r}")
    kernel, stride, padding = pool
    check_int("pool kernel", kernel, 1)
    check_int("pool stride", stride, 1)
    check_int("pool padding", padding, 0)
    if 2 * padding > kernel:
        raise ValueError(f"pool padding must be at most half the pool kernel, got pool={pool!r}")
    return kernel, stride, padding


def tokenize(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, stride: int = 1, padding: int = 0,
    relu: bool = True, pool: tuple[int, int, int] | None = (3, 2, 1), to_tokens: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """One tokenizer stage; see the module docstring for shapes, dtypes and limits."""
    check_tensor("x", x, ndim=4)
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_tensor("weight", weight, ndim=4, like=x)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, like=x)
        check_shape("bias", bias, (weight.shape[0],))
    if min(weight.shape) == 0:
        raise ValueError(
            f"weight (C_out, C_in, kh, kw) must have at least one output channel, input channel and kernel row and "
            f"column, got shape {tuple(weight.shape)}"
        )
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight expects {weight.shape[1]} input channels (shape {tuple(weight.shape)}), "
            f"x has {x.shape[1]} (shape {tuple(x.shape)})"
        )
    check_int("stride", stride, 1)
    check_int("padding", padding, 0)
    check_bool("relu", relu)
    check_bool("to_tokens", to_tokens)
    pool_kernel, pool_stride, pool_padding = _pool_params(pool)
    shape = output_shape(x.shape, weight.shape, stride, padding, pool_kernel, pool_stride, pool_padding, False)
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(
            f"input of size {tuple(x.shape[2:])} is too small for a {tuple(weight.shape[2:])} convolution "
            f"(stride {stride}, padding {padding}) and pool {pool}"
        )
    name = backends.select(
        OP, backend, x.device, x, weight, bias, stride, padding, relu, pool_kernel, pool_stride, pool_padding,
        to_tokens,
    )
    if name == "eager":
        return reference.tokenize(
            x, weight, bias, stride=stride, padding=padding, relu=relu, pool=pool, to_tokens=to_tokens
        )
    if memory_format(x) != torch.channels_last:  # a channels-last x (the previous stage's) stays as it is
        x = x.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    forward = KERNELS.forward_for(x, weight, bias)
    return forward(x, weight, bias, stride, padding, relu, pool_kernel, pool_stride, pool_padding, to_tokens, name)[0]

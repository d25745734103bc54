"""Multi-head self-attention straight from the packed qkv projection output, heads merged on the way out.

    attention(qkv, H) = concat_h softmax(q_h k_h^T * scale) v_h,   q, k, v = qkv.reshape(B, N, 3, H, d)

Shapes: qkv (B, N, 3*H*d) -> (B, N, H*d), the layout the official CCT Attention produces and consumes, so no
permute copies are needed. Dtypes: float32, float16, bfloat16 (kernels accumulate in float32). scale defaults to
d**-0.5. dropout_p in [0, 1) drops attention probabilities (the official attn_drop); pass it only in training.
mask: key padding for text models, a (B, N) bool tensor (True = real token) or (B,) integer lengths (the first
lengths[b] tokens are real). Every query attends to real keys only (padded query rows get values too, from the
real keys); a sequence with no real token gives zeros. The kernels take lengths (every kernel backend serves them
within its own limits - triton head dims up to 128, cuda float16/bfloat16 at head dim 64 - skipping the key
blocks of padding); a bool mask that is not a prefix of each sequence runs on eager only, and under torch.compile
or a CUDA graph capture a bool mask is served as given by eager (pass lengths there).

Kernel backends implement two registered ops (the kernel-module interface of cct_kernels.backends):
    forward(qkv, num_heads, scale, dropout_p, seed, lengths) -> (out (B, N, H*d) qkv.dtype, lse (B, H, N) float32)
    backward(grad_out, qkv, out, lse, num_heads, scale, dropout_p, seed, lengths) -> grad_qkv (B, N, 3*H*d)
`lengths` is None or (B,) int64 key padding (see mask); unsupported(qkv, num_heads, scale, dropout_p, lengths)
declines what a kernel cannot serve.
`seed` is an int64 tensor of shape (1,) on qkv's device when dropout_p > 0 (empty otherwise): the kernel derives
its dropout mask from it, so forward and backward drop the same probabilities.

Errors (from attention's own checks, before any kernel runs):
    TypeError   qkv not a floating-point torch.Tensor; num_heads not an int; scale or dropout_p not a real number;
                mask neither a bool tensor nor integer lengths.
    ValueError  qkv not 3-dimensional; num_heads < 1; qkv's last dim 0 or not a multiple of 3 * num_heads;
                scale NaN, infinite or <= 0; dropout_p outside [0, 1); mask not (B, N) / (B,) or on another
                device; lengths outside [0, N]; an unknown backend name.
    BackendUnavailable  an explicitly named backend cannot serve the call (the message says why).
    RuntimeError  double backward through a kernel backend (use backend="eager" for that).
"""
from __future__ import annotations

import torch

from cct_kernels import backends, reference
from cct_kernels.ops._checks import (
    NOT_A_PREFIX, autocast_inputs, check_int, check_real, check_tensor, is_positive_finite, key_padding,
)
from cct_kernels.ops._launch import KernelOp, new_seed, run_kernel

OP = "attention"


def _run_forward(
    qkv: torch.Tensor, num_heads: int, scale: float, dropout_p: float, seed: torch.Tensor, backend: str,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return run_kernel(backend, OP, "forward", qkv.device, qkv, num_heads, scale, dropout_p, seed, lengths)


_forward = torch.library.custom_op("cct_kernels::attention_forward", _run_forward, mutates_args=())


@_forward.register_fake
def _(qkv, num_heads, scale, dropout_p, seed, backend, lengths=None):
    B, N, three_d = qkv.shape
    return qkv.new_empty(B, N, three_d // 3), qkv.new_empty(B, num_heads, N, dtype=torch.float32)


def _run_backward(
    grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    num_heads: int, scale: float, dropout_p: float, seed: torch.Tensor, backend: str,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    return run_kernel(backend, OP, "backward", qkv.device, grad_out, qkv, out, lse, num_heads, scale, dropout_p, seed,
                      lengths)


_backward = torch.library.custom_op("cct_kernels::attention_backward", _run_backward, mutates_args=())


@_backward.register_fake
def _(grad_out, qkv, out, lse, num_heads, scale, dropout_p, seed, backend, lengths=None):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale, dropout_p, seed, backend, lengths = inputs
    ctx.save_for_backward(qkv, seed, lengths, *output)
    ctx.args = (num_heads, scale, dropout_p, backend)


def _autograd_backward(ctx, grad_out, _grad_lse):
    qkv, seed, lengths, out, lse = ctx.saved_tensors
    num_heads, scale, dropout_p, backend = ctx.args
    backward = KERNELS.backward_for(grad_out, qkv)
    grad_qkv = backward(grad_out.contiguous(), qkv, out, lse, num_heads, scale, dropout_p, seed, backend, lengths)
    return grad_qkv, None, None, None, None, None, None


KERNELS = KernelOp(OP, _run_forward, _forward, _run_backward, _backward, _setup_context, _autograd_backward)


def attention(
    qkv: torch.Tensor, num_heads: int, *, scale: float | None = None, dropout_p: float = 0.0,
    mask: torch.Tensor | None = None, backend: str | None = None,
) -> torch.Tensor:
    """Self-attention over packed qkv; see the module docstring for shapes, dtypes and limits."""
    check_tensor("qkv", qkv, ndim=3)
    (qkv,) = autocast_inputs(qkv)
    check_int("num_heads", num_heads, 1)
    if qkv.shape[2] == 0 or qkv.shape[2] % (3 * num_heads) != 0:
        raise ValueError(
            f"qkv's last dim must be 3 * num_heads * head_dim with head_dim >= 1; got {qkv.shape[2]} "
            f"with num_heads={num_heads} (qkv shape {tuple(qkv.shape)})"
        )
    dropout_p = check_real("dropout_p", dropout_p, "in [0, 1)", lambda p: 0.0 <= p < 1.0)
    if scale is None:
        scale = (qkv.shape[2] // (3 * num_heads)) ** -0.5
    else:
        scale = check_real("scale", scale, "finite and > 0", is_positive_finite)
    qkv = qkv.contiguous()
    padding = key_padding(mask, qkv.shape[0], qkv.shape[1], qkv.device)
    lengths = None if padding is None else padding.lengths
    eager_only = NOT_A_PREFIX if padding is not None and lengths is None else None
    name = backends.select(OP, backend, qkv.device, qkv, num_heads, scale, dropout_p, lengths, eager_only=eager_only)
    if name == "eager":
        return reference.attention(qkv, num_heads, scale=scale, dropout_p=dropout_p,
                                   mask=None if padding is None else padding.mask)
    seed = new_seed(qkv.device) if dropout_p > 0 else qkv.new_empty(0, dtype=torch.int64)
    forward = KERNELS.forward_for(qkv)
    return forward(qkv, num_heads, scale, dropout_p, seed, name, lengths)[0]

"""Multi-head self-attention straight from the packed qkv projection output, heads merged on the way out.

    attention(qkv, H) = concat_h softmax(q_h k_h^T * scale) v_h,   q, k, v = qkv.reshape(B, N, 3, H, d)

Shapes: qkv (B, N, 3*H*d) -> (B, N, H*d), the layout the official CCT Attention produces and consumes, so no
permute copies are needed. Dtypes: float32, float16, bfloat16 (kernels accumulate in float32). scale defaults to
d**-0.5. dropout_p in [0, 1) drops attention probabilities (the official attn_drop); pass it only in training.

Kernel backends implement two registered ops (the kernel-module interface of cct_kernels.backends):
    forward(qkv, num_heads, scale, dropout_p, seed) -> (out (B, N, H*d) qkv.dtype, lse (B, H, N) float32)
    backward(grad_out, qkv, out, lse, num_heads, scale, dropout_p, seed) -> grad_qkv (B, N, 3*H*d)
`seed` is an int64 tensor of shape (1,) on qkv's device when dropout_p > 0 (empty otherwise): the kernel derives
its dropout mask from it, so forward and backward drop the same probabilities.
"""
from __future__ import annotations

import torch

from cct_kernels import backends, reference
from cct_kernels.ops._checks import autocast_inputs, check_tensor

OP = "attention"


def _kernel(backend: str):
    return backends.kernel_module(backend, OP)


@torch.library.custom_op("cct_kernels::attention_forward", mutates_args=())
def _forward(
    qkv: torch.Tensor, num_heads: int, scale: float, dropout_p: float, seed: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernel(backend).forward(qkv, num_heads, scale, dropout_p, seed)


@_forward.register_fake
def _(qkv, num_heads, scale, dropout_p, seed, backend):
    B, N, three_d = qkv.shape
    return qkv.new_empty(B, N, three_d // 3), qkv.new_empty(B, num_heads, N, dtype=torch.float32)


@torch.library.custom_op("cct_kernels::attention_backward", mutates_args=())
def _backward(
    grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    num_heads: int, scale: float, dropout_p: float, seed: torch.Tensor, backend: str,
) -> torch.Tensor:
    return _kernel(backend).backward(grad_out, qkv, out, lse, num_heads, scale, dropout_p, seed)


@_backward.register_fake
def _(grad_out, qkv, out, lse, num_heads, scale, dropout_p, seed, backend):
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale, dropout_p, seed, backend = inputs
    ctx.save_for_backward(qkv, seed, *output)
    ctx.args = (num_heads, scale, dropout_p, backend)


def _autograd_backward(ctx, grad_out, _grad_lse):
    qkv, seed, out, lse = ctx.saved_tensors
    num_heads, scale, dropout_p, backend = ctx.args
    grad_qkv = _backward(grad_out.contiguous(), qkv, out, lse, num_heads, scale, dropout_p, seed, backend)
    return grad_qkv, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def new_seed(device: torch.device) -> torch.Tensor:
    """A fresh dropout seed drawn from torch's generator for `device` (so torch.manual_seed reproduces it)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def attention(
    qkv: torch.Tensor, num_heads: int, *, scale: float | None = None, dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Self-attention over packed qkv; see the module docstring for shapes, dtypes and limits."""
    check_tensor("qkv", qkv, ndim=3)
    (qkv,) = autocast_inputs(qkv)
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if qkv.shape[2] % (3 * num_heads) != 0:
        raise ValueError(
            f"qkv's last dim must be 3 * num_heads * head_dim; got {qkv.shape[2]} with num_heads={num_heads}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = (qkv.shape[2] // (3 * num_heads)) ** -0.5 if scale is None else float(scale)
    qkv = qkv.contiguous()
    name = backends.select(OP, backend, qkv.device, qkv, num_heads, scale, dropout_p)
    if name == "eager":
        return reference.attention(qkv, num_heads, scale=scale, dropout_p=dropout_p)
    seed = new_seed(qkv.device) if dropout_p > 0 else qkv.new_empty(0, dtype=torch.int64)
    return _forward(qkv, num_heads, scale, dropout_p, seed, name)[0]

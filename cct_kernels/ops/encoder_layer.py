"""The CCT encoder block in inference as one op: one kernel call where a backend has a fused block (cpu), else the
block's ops one by one on the requested backend.

    encoder_layer(src, ...) = linear2(GELU(linear1(s))) + s,  s = norm1(proj(attention(qkv(pre_norm(src)))) + src)
(norm1 in proj's epilogue, as ops.linear's LayerNorm epilogue)

(the official TransformerEncoderLayer in eval mode: no dropout, no stochastic depth). Why an op of its own: at batch
1 the block's eight op calls from Python cost ~15-20 us each (NOTES.md, cpu extension, fifth round); the cpu kernel
runs the same kernels in the same order in C++, so the output is the same to the bit.

Shapes: src (B, N, D); pre_norm_weight/bias, norm1_weight/bias (D,); qkv_weight (3D, D); proj_weight (D, D),
proj_bias (D,); linear1_weight (F, D), linear1_bias (F,); linear2_weight (D, F), linear2_bias (D,); mask None or
(B, N) bool (True = real token, as ops.attention) -> (B, N, D). Dtypes: float32, float16, bfloat16, all the same.
num_heads an int >= 1 dividing D; scale a positive float (default head_dim ** -0.5); eps positive floats.

Kernel backends implement (the kernel-module interface of cct_kernels.backends):
    forward(src, pre_norm_weight, pre_norm_bias, qkv_weight, proj_weight, proj_bias, norm1_weight, norm1_bias,
            linear1_weight, linear1_bias, linear2_weight, linear2_bias, num_heads, scale, pre_norm_eps, norm1_eps)
        -> (B, N, D), every tensor contiguous
    unsupported(src, mask, *, backend) -> why a kernel cannot serve the call, or None
The cpu forward is the extension's C++ op torch.ops.cct_kernels_C.encoder_layer_forward, registered with its fake
(extension/encoder_layer.py) and traced as itself under torch.compile: the compiled graph calls it with no Python in
between (the other ops go through Python custom ops, ~20 us a call).
The fused kernel serves calls that need no gradient, carry no mask and run outside torch.autocast (where the
parameters may differ in dtype from src, as for the modules' ops); every other call
(and every backend without a fused block: triton, cuda, eager) runs the ops one by one with the same backend
argument, so gradients, masks and autocast behave as in the op-by-op block.

Errors (before any kernel runs):
    TypeError   a tensor argument not a floating-point torch.Tensor, or dtypes that differ; num_heads not an int.
    ValueError  src not 3-D; a parameter of the wrong shape (the message names it and the expected shape);
                num_heads < 1 or not dividing D; scale or an eps not a positive finite number; tensors on
                different devices; an unknown backend name.
    BackendUnavailable  an explicitly named backend cannot serve one of the block's ops (the message says why).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cct_kernels import backends, ops  # the block's ops through the package, as the nn modules call them
from cct_kernels.ops._checks import check_int, check_real, check_shape, check_tensor, is_positive_finite

OP = "encoder_layer"
_FUSED_BACKEND = "cpu"


def encoder_layer(
    src: torch.Tensor, *, pre_norm_weight: torch.Tensor, pre_norm_bias: torch.Tensor, qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor, norm1_weight: torch.Tensor, norm1_bias: torch.Tensor,
    linear1_weight: torch.Tensor, linear1_bias: torch.Tensor, linear2_weight: torch.Tensor,
    linear2_bias: torch.Tensor, num_heads: int, scale: float | None = None, pre_norm_eps: float = 1e-5,
    norm1_eps: float = 1e-5, mask: torch.Tensor | None = None, backend: str | None = None,
) -> torch.Tensor:
    """The encoder block in eval mode; see the module docstring for shapes, dtypes, limits and errors."""
    check_tensor("src", src, ndim=3, like_name="src")
    dim = src.shape[-1]
    check_int("num_heads", num_heads, 1)
    if dim % num_heads:
        raise ValueError(f"num_heads ({num_heads}) must divide src's last dim D = {dim}")
    autocast = torch.is_autocast_enabled(src.device.type)
    like = None if autocast else src  # under autocast the block's ops cast their inputs, as the modules' ops do
    check_tensor("linear1_weight", linear1_weight, ndim=2, like=like, like_name="src")
    hidden = linear1_weight.shape[0]
    params = {
        "pre_norm_weight": (pre_norm_weight, (dim,)), "pre_norm_bias": (pre_norm_bias, (dim,)),
        "qkv_weight": (qkv_weight, (3 * dim, dim)), "proj_weight": (proj_weight, (dim, dim)),
        "proj_bias": (proj_bias, (dim,)), "norm1_weight": (norm1_weight, (dim,)), "norm1_bias": (norm1_bias, (dim,)),
        "linear1_weight": (linear1_weight, (hidden, dim)), "linear1_bias": (linear1_bias, (hidden,)),
        "linear2_weight": (linear2_weight, (dim, hidden)), "linear2_bias": (linear2_bias, (dim,)),
    }
    for name, (tensor, shape) in params.items():
        check_tensor(name, tensor, like=like, like_name="src")
        check_shape(name, tensor, shape)
    scale = (dim // num_heads) ** -0.5 if scale is None else check_real("scale", scale, "positive", is_positive_finite)
    pre_norm_eps = check_real("pre_norm_eps", pre_norm_eps, "positive", is_positive_finite)
    norm1_eps = check_real("norm1_eps", norm1_eps, "positive", is_positive_finite)
    tensors = [t for t, _ in params.values()]
    if not autocast and _runs_fused(src, tensors, mask, backend):
        # The extension's C++ op itself (its fake: extension/encoder_layer.py), also under torch.compile, where the
        # graph then calls it with no Python in between.
        return backends.kernel_module(_FUSED_BACKEND, OP).forward(
            src.contiguous(), *(t.contiguous() for t in tensors), num_heads, scale, pre_norm_eps, norm1_eps)
    normed = F.layer_norm(src, (dim,), pre_norm_weight, pre_norm_bias, pre_norm_eps)
    qkv = ops.linear(normed, qkv_weight, backend=backend)
    heads = ops.attention(qkv, num_heads, scale=scale, mask=mask, backend=backend)
    stream = ops.linear(heads, proj_weight, proj_bias, residual=src, norm_weight=norm1_weight, norm_bias=norm1_bias,
                        norm_eps=norm1_eps, backend=backend)
    mlp = ops.linear(stream, linear1_weight, linear1_bias, activation="gelu", backend=backend)
    return ops.linear(mlp, linear2_weight, linear2_bias, residual=stream, backend=backend)


def _runs_fused(src, tensors, mask, backend) -> bool:
    """Whether the fused kernel serves this call: asked for (cpu) or allowed (auto), and able to."""
    if backends.requested_backend(backend) not in ("auto", _FUSED_BACKEND) or mask is not None:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (src, *tensors)):
        return False
    return backends.unsupported_reason(_FUSED_BACKEND, OP, src.device, src, mask) is None

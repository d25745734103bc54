"""A linear layer with its prologue and epilogue fused: the encoder block's four linears and the LayerNorms, GELU,
dropouts and residual adds around them.

    linear(x, weight, bias, activation, residual, row_scale, dropout_p, norm, input_norm)
        = norm(dropout(activation(input_norm(x) @ weight.T + bias), dropout_p) * row_scale + residual)

norm and input_norm are LayerNorms over the last dim, each on when its weight is given (norm_weight (N,) and
input_norm_weight (K,), biases optional, eps > 0). The block uses it as qkv (input_norm: pre_norm, no bias), proj
(proj_drop, + residual stream, norm: norm1), linear1 (GELU, dropout1) and linear2 (dropout2, + residual stream), so
none of these makes a pass of its own over memory where a kernel fuses it (input_norm is the exception: a row pass
ahead of the GEMM on every backend; on the H200, normalising a Triton GEMM's tiles as they loaded made qkv 2x
slower than linear1's kernel per FLOP). In training, stochastic depth is the row_scale (one factor per row: 0 or
1 / keep_prob per sample).

Shapes: x (..., K), weight (N, K), bias (N,) or None, residual (..., N) or None, row_scale (...) or None (not
differentiated: a constant such as a drop mask), norm_weight / norm_bias (N,), input_norm_weight / input_norm_bias
(K,) -> (..., N). Dtypes: float32, float16, bfloat16, all tensors the same. activation: "none" or "gelu" (exact erf
GELU, F.gelu's default; not with norm). dropout_p in [0, 1]: pass it only in training (kept values are scaled by
1 / (1 - p); p = 1 gives zeros, as F.dropout). Any M = prod(x.shape[:-1]) >= 0, K >= 1, N >= 1; the triton
backend's LayerNorms hold whole rows: norm N <= 1024, input_norm K <= 8192 (it declines wider rows).
Dropout's mask: on the eager backend F.dropout's (torch's generator, as the official nn.Dropout). Every kernel
backend draws reference.linear_dropout_mask(seed, M, N, p) (a counter-based hash of the row and column) from a
seed the op takes from torch's generator, so torch.manual_seed reproduces a run and the backward redraws the mask
instead of keeping it; the drop rate is p rounded to a multiple of 2**-24.

Kernel backends implement two registered ops (the kernel-module interface of cct_kernels.backends); x and
residual arrive flattened to 2-D, every tensor contiguous:
    forward(x (M, K), weight, bias, residual (M, N) | None, activation, save_for_backward, row_scale (M,) | None,
            dropout_p, seed, norm_weight, norm_bias, norm_eps, input_norm_weight, input_norm_bias, input_norm_eps)
        -> (out (M, N);
            saved (M, N) with save_for_backward: the GELU's input h, or the sum the norm normalised; else (0,);
            stats (2, M) float32 with norm: its mean and 1 / std per row; else (0,);
            input_stats (2, M) float32 with input_norm: the same for x's rows; else (0,))
    backward(grad_out (M, N), x, weight, has_bias, pre_activation, activation, row_scale, dropout_p, seed,
             input_norm_weight, input_norm_bias, input_stats)
        -> (grad of the GEMM's input (M, K) (input_norm(x) with input_norm), grad_weight (N, K), grad_bias (N,) or
           an empty (0,) tensor without bias), through grad_h = GELU'(h) * mask / (1 - p) * row_scale * grad_out;
           grad_out is the gradient at the sum, before norm
    unsupported(x, weight, bias, residual, activation, norm_weight, input_norm_weight, *, backend) -> why a kernel
        cannot serve the call, or None
and may define the LayerNorms' backward (the triton backend does):
    layer_norm_backward(grad (R, C), normalised (R, C), stats (2, R) float32, weight (C,), has_bias)
        -> (grad_input, grad_weight, grad_bias or an empty (0,) tensor);  layer_norm_backward_reason(R, C) -> str | None
seed: a (1,) int64 tensor on x's device when dropout_p > 0, else None. The residual's gradient is grad_out itself,
passed through by autograd with no kernel; both LayerNorms' backwards run from the kernels' row statistics, on the
backend's layer_norm_backward in a plain eager backward where it has one, else on ATen's LayerNorm backward.

Errors (from linear's own checks, before any kernel runs):
    TypeError   a tensor argument not a floating-point torch.Tensor, or dtypes that differ.
    ValueError  x of rank 0; weight not 2-D or K = 0; x's last dim not weight's K; bias, norm_weight or norm_bias
                not (N,); input_norm_weight or input_norm_bias not (K,); a norm bias without its weight; norm with
                activation "gelu"; residual not x.shape[:-1] + (N,); row_scale not x.shape[:-1]; tensors on
                different devices; activation not "none"/"gelu"; dropout_p not a number in [0, 1]; an eps not a
                positive number; an unknown backend name.
    BackendUnavailable  an explicitly named backend cannot serve the call (the message says why).
    RuntimeError  double backward through a kernel backend (use backend="eager" for that).
"""
from __future__ import annotations

import torch

from cct_kernels import backends, reference
from cct_kernels.ops._checks import autocast_inputs, check_real, check_shape, check_tensor, is_positive_finite
from cct_kernels.ops._launch import KernelOp, new_seed, run_kernel, traced

OP = "linear"
ACTIVATIONS = reference.ACTIVATIONS


def _saved_shape(x, weight, activation, save_for_backward, norm):
    return (x.shape[0], weight.shape[0]) if save_for_backward and (activation == "gelu" or norm) else (0,)


def _run_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
    activation: str, save_for_backward: bool, backend: str, row_scale: torch.Tensor | None = None,
    dropout_p: float = 0.0, seed: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None, norm_eps: float = 1e-5, input_norm_weight: torch.Tensor | None = None,
    input_norm_bias: torch.Tensor | None = None, input_norm_eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_kernel(backend, OP, "forward", x.device, x, weight, bias, residual, activation, save_for_backward,
                      row_scale, dropout_p, seed, norm_weight, norm_bias, norm_eps, input_norm_weight,
                      input_norm_bias, input_norm_eps)


_forward = torch.library.custom_op("cct_kernels::linear_forward", _run_forward, mutates_args=())


@_forward.register_fake
def _(x, weight, bias, residual, activation, save_for_backward, backend, row_scale=None, dropout_p=0.0, seed=None,
      norm_weight=None, norm_bias=None, norm_eps=1e-5, input_norm_weight=None, input_norm_bias=None,
      input_norm_eps=1e-5):
    norm = norm_weight is not None
    saved = x.new_empty(_saved_shape(x, weight, activation, save_for_backward, norm))

    def stats(on):
        return x.new_empty((2, x.shape[0]) if on else (0,), dtype=torch.float32)

    return x.new_empty(x.shape[0], weight.shape[0]), saved, stats(norm), stats(input_norm_weight is not None)


def _run_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, pre_activation: torch.Tensor,
    activation: str, backend: str, row_scale: torch.Tensor | None = None, dropout_p: float = 0.0,
    seed: torch.Tensor | None = None, input_norm_weight: torch.Tensor | None = None,
    input_norm_bias: torch.Tensor | None = None, input_stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return run_kernel(backend, OP, "backward", x.device, grad_out, x, weight, has_bias, pre_activation, activation,
                      row_scale, dropout_p, seed, input_norm_weight, input_norm_bias, input_stats)


_backward = torch.library.custom_op("cct_kernels::linear_backward", _run_backward, mutates_args=())


@_backward.register_fake
def _(grad_out, x, weight, has_bias, pre_activation, activation, backend, row_scale=None, dropout_p=0.0, seed=None,
      input_norm_weight=None, input_norm_bias=None, input_stats=None):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0] if has_bias else 0)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, residual, activation, save_for_backward, backend, row_scale, dropout_p, seed, norm_weight,
     norm_bias, norm_eps, input_norm_weight, input_norm_bias, input_norm_eps) = inputs
    ctx.save_for_backward(x, weight, output[1], output[2], output[3], row_scale, seed, norm_weight, norm_bias,
                          input_norm_weight, input_norm_bias)
    ctx.args = (bias is not None, residual is not None, activation, backend, dropout_p)


def _autograd_backward(ctx, grad_out, _grad_saved, _grad_stats, _grad_input_stats):
    (x, weight, saved, stats, input_stats, row_scale, seed, norm_weight, norm_bias, input_norm_weight,
     input_norm_bias) = ctx.saved_tensors
    has_bias, has_residual, activation, backend, dropout_p = ctx.args
    grad_out = grad_out.contiguous()
    needs_saved = activation == "gelu" or norm_weight is not None
    if needs_saved and saved.numel() == 0 and grad_out.numel() > 0:
        raise RuntimeError("linear_forward ran with save_for_backward=False, so the GELU's or the LayerNorm's input "
                           "was not kept for the backward; pass True when a gradient is needed (ops.linear does)")
    grad_norm_weight = grad_norm_bias = None
    if norm_weight is not None:
        grad_out, grad_norm_weight, grad_norm_bias = _layer_norm_backward(grad_out, saved, stats, norm_weight,
                                                                          norm_bias, backend)
    pre_activation = saved if activation == "gelu" else saved.new_empty(0)
    backward = KERNELS.backward_for(grad_out, x)
    grad_x, grad_weight, grad_bias = backward(grad_out, x, weight, has_bias, pre_activation, activation, backend,
                                              row_scale, dropout_p, seed, input_norm_weight, input_norm_bias,
                                              input_stats)
    grad_input_norm_weight = grad_input_norm_bias = None
    if input_norm_weight is not None:  # grad_x is the gradient at input_norm(x)
        grad_x, grad_input_norm_weight, grad_input_norm_bias = _layer_norm_backward(
            grad_x, x, input_stats, input_norm_weight, input_norm_bias, backend)
    return (grad_x, grad_weight, grad_bias if has_bias else None, grad_out if has_residual else None,
            None, None, None, None, None, None, grad_norm_weight, grad_norm_bias, None, grad_input_norm_weight,
            grad_input_norm_bias, None)


def _layer_norm_backward(grad, normalised, stats, weight, bias, backend):
    """A LayerNorm's backward from the kernels' row statistics: (grad of the rows it normalised, grad weight, grad
    bias). On the backend's own kernel where its kernel module has one (layer_norm_backward: triton) in a plain
    eager backward, else on ATen's (whose CPU kernel takes the statistics in the input's dtype, its CUDA kernel in
    float32; torch.compile fuses what it traces, and a recorded backward (create_graph) stays differentiable)."""
    module = backends.kernel_module(backend, OP)
    if (hasattr(module, "layer_norm_backward") and not torch.is_grad_enabled() and not traced((grad, normalised))
            and module.layer_norm_backward_reason(*grad.shape) is None):
        grad_input, grad_weight, grad_bias = run_kernel(backend, OP, "layer_norm_backward", grad.device, grad,
                                                        normalised, stats, weight, bias is not None)
        return grad_input, grad_weight, grad_bias if bias is not None else None
    stat_dtype = normalised.dtype if normalised.device.type == "cpu" else torch.float32
    mean, rstd = (t.to(stat_dtype).view(-1, 1) for t in stats)
    return torch.ops.aten.native_layer_norm_backward(grad, normalised, [normalised.shape[-1]], mean, rstd, weight,
                                                     bias, [True, True, bias is not None])


KERNELS = KernelOp(OP, _run_forward, _forward, _run_backward, _backward, _setup_context, _autograd_backward)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, activation: str = "none",
    residual: torch.Tensor | None = None, row_scale: torch.Tensor | None = None, dropout_p: float = 0.0,
    norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None, norm_eps: float = 1e-5,
    input_norm_weight: torch.Tensor | None = None, input_norm_bias: torch.Tensor | None = None,
    input_norm_eps: float = 1e-5, backend: str | None = None,
) -> torch.Tensor:
    """norm(dropout(activation(input_norm(x) @ weight.T + bias), dropout_p) * row_scale + residual) (each norm only
    with its weight); see the module docstring for shapes, dtypes, limits and errors."""
    check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., K), got a 0-dimensional tensor")
    x, weight, bias, residual, row_scale, norm_weight, norm_bias, input_norm_weight, input_norm_bias = \
        autocast_inputs(x, weight, bias, residual, row_scale, norm_weight, norm_bias, input_norm_weight,
                        input_norm_bias)
    check_tensor("weight", weight, ndim=2, like=x)
    out_features, in_features = weight.shape
    if in_features == 0 or out_features == 0:
        raise ValueError(f"weight must be (N, K) with N, K >= 1, got shape {tuple(weight.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must equal weight's in_features K = {in_features} "
                         f"(x shape {tuple(x.shape)}, weight shape {tuple(weight.shape)})")
    out_shape = (*x.shape[:-1], out_features)
    for name, tensor, size in (("bias", bias, out_features), ("norm_weight", norm_weight, out_features),
                               ("norm_bias", norm_bias, out_features),
                               ("input_norm_weight", input_norm_weight, in_features),
                               ("input_norm_bias", input_norm_bias, in_features)):
        if tensor is not None:
            check_tensor(name, tensor, ndim=1, like=x)
            check_shape(name, tensor, (size,))
    if residual is not None:
        check_tensor("residual", residual, like=x)
        check_shape("residual", residual, out_shape)
    if row_scale is not None:
        check_tensor("row_scale", row_scale, like=x)
        check_shape("row_scale", row_scale, x.shape[:-1])
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    dropout_p = check_real("dropout_p", dropout_p, "in [0, 1]", lambda p: 0.0 <= p <= 1.0)
    for prefix, weight_, bias_ in (("norm", norm_weight, norm_bias), ("input_norm", input_norm_weight,
                                                                      input_norm_bias)):
        if weight_ is None and bias_ is not None:
            raise ValueError(f"{prefix}_bias needs {prefix}_weight (the LayerNorm is on when {prefix}_weight is "
                             "given)")
    if norm_weight is not None and activation != "none":
        raise ValueError(f"the LayerNorm epilogue follows no activation: activation must be 'none' with "
                         f"norm_weight, got {activation!r}")
    norm_eps = check_real("norm_eps", norm_eps, "positive", is_positive_finite)
    input_norm_eps = check_real("input_norm_eps", input_norm_eps, "positive", is_positive_finite)
    x2 = x.reshape(-1, in_features).contiguous()
    weight = weight.contiguous()
    bias, norm_weight, norm_bias, input_norm_weight, input_norm_bias = (
        None if t is None else t.contiguous() for t in (bias, norm_weight, norm_bias, input_norm_weight,
                                                         input_norm_bias))
    norms = (norm_weight, norm_bias, norm_eps, input_norm_weight, input_norm_bias, input_norm_eps)
    residual2 = None if residual is None else residual.reshape(-1, out_features).contiguous()
    scale2 = None if row_scale is None else row_scale.detach().reshape(-1).contiguous()
    name = backends.select(OP, backend, x.device, x2, weight, bias, residual2, activation, norm_weight,
                           input_norm_weight)
    if name == "eager":
        return reference.linear(x, weight, bias, activation=activation, residual=residual,
                                row_scale=None if row_scale is None else row_scale.detach(), dropout_p=dropout_p,
                                norm_weight=norm_weight, norm_bias=norm_bias, norm_eps=norm_eps,
                                input_norm_weight=input_norm_weight, input_norm_bias=input_norm_bias,
                                input_norm_eps=input_norm_eps)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, weight, bias, residual, norm_weight, norm_bias, input_norm_weight, input_norm_bias))
    tensors = (x2, weight, bias, residual2, norm_weight, norm_bias, input_norm_weight, input_norm_bias)
    forward = KERNELS.forward_for(*tensors)
    seed = new_seed(x.device) if dropout_p > 0 else None
    out = forward(x2, weight, bias, residual2, activation, needs_grad, name, scale2, dropout_p, seed, *norms)[0]
    return out.view(out_shape)

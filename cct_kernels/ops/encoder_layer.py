"""The CCT encoder block as one op: in inference one kernel call where a backend has a fused block (cpu), in plain
eager training one autograd node around the block's kernels, else the block's ops one by one.

    encoder_layer(src, ...) = linear2(GELU(linear1(s))) + s,  s = norm1(proj(attention(qkv(pre_norm(src)))) + src)
(pre_norm in qkv's prologue and norm1 in proj's epilogue, as ops.linear's LayerNorms), in training with the
official dropouts (attention_dropout_p on the attention probabilities; dropout_p after proj, linear1's GELU and
linear2) and stochastic depth (drop_path_rate: proj's and linear2's outputs scaled per sample by 0 or
1 / (1 - rate), two draws, as ops.linear's row_scale). Random draws in the op-by-op block's order (attention's seed,
proj's row scale and seed, linear1's seed, linear2's row scale and seed), so every path draws the same masks.

Why an op of its own: each op call costs host time around its kernels. At batch 1 on the CPU the block's eight op
calls from Python cost ~15-20 us each (NOTES.md, cpu extension, fifth round): the cpu kernel runs the same kernels
in the same order in C++, so the output is the same to the bit. In training on a GPU the step is host-bound
(NOTES.md, first GPU run): one autograd node for the block (_BlockFunction) runs the same kernels, checked and
selected once, and its backward calls the ops' own backward formulas in reverse, so outputs and gradients equal
the op-by-op block's to the bit.

encoder_layers(src, layers) runs blocks in sequence (the encoder of a model), one C++ call for all of them where the
fused kernel serves every one: at batch 1 the Python between the blocks' calls cost ~5% of a forward (NOTES.md, cpu
extension, eighth round).

Shapes: src (B, N, D); pre_norm_weight/bias, norm1_weight/bias (D,); qkv_weight (3D, D); proj_weight (D, D),
proj_bias (D,); linear1_weight (F, D), linear1_bias (F,); linear2_weight (D, F), linear2_bias (D,); mask None,
(B, N) bool (True = real token) or (B,) lengths, as ops.attention -> (B, N, D). Dtypes: float32, float16,
bfloat16, all the same. num_heads an int >= 1 dividing D; scale a positive float (default head_dim ** -0.5); eps
positive floats; attention_dropout_p in [0, 1), dropout_p and drop_path_rate in [0, 1] (pass them only in training).

Kernel backends implement (the kernel-module interface of cct_kernels.backends):
    forward(src, pre_norm_weight, pre_norm_bias, qkv_weight, proj_weight, proj_bias, norm1_weight, norm1_bias,
            linear1_weight, linear1_bias, linear2_weight, linear2_bias, num_heads, scale, pre_norm_eps, norm1_eps)
        -> (B, N, D), every tensor contiguous
    unsupported(src, mask, *, backend) -> why a kernel cannot serve the call, or None
The cpu forward is the extension's C++ op torch.ops.cct_kernels_C.encoder_layer_forward, registered with its fake
(extension/encoder_layer.py) and traced as itself under torch.compile: the compiled graph calls it with no Python in
between (the other ops go through Python custom ops, ~20 us a call).
Which path serves a call:
- the fused kernel: no gradient to record, no dropout or stochastic depth, no mask, outside torch.autocast (where
  the parameters may differ in dtype from src, as for the modules' ops) and torch.func transforms, backend cpu or
  auto;
- _BlockFunction (with a gradient to record; the same kernels without the autograd node otherwise): a plain eager
  call (not traced by torch.compile, TorchScript or a torch.func transform) where every one of the block's five
  op calls selects a kernel backend;
- otherwise the ops one by one with the same backend argument (eager, traced calls, a bool mask that is not a
  prefix of each sequence), so gradients, masks and autocast behave as in the op-by-op block.

Errors (before any kernel runs):
    TypeError   a tensor argument not a floating-point torch.Tensor, or dtypes that differ; num_heads not an int;
                a rate not a real number; mask neither a bool tensor nor integer lengths.
    ValueError  src not 3-D; a parameter of the wrong shape (the message names it and the expected shape);
                num_heads < 1 or not dividing D; scale or an eps not a positive finite number; a rate out of range;
                tensors or mask on different devices; an unknown backend name.
    BackendUnavailable  an explicitly named backend cannot serve one of the block's ops (the message says why).
    RuntimeError  double backward through a kernel backend (use backend="eager" for that).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cct_kernels import backends, ops  # the block's ops through the package, as the nn modules call them
from cct_kernels.ops._checks import (
    autocast_inputs, check_int, check_real, check_shape, check_tensor, is_positive_finite, key_padding,
)
from cct_kernels.ops._launch import new_seed, traced
from cct_kernels.ops.attention import KERNELS as ATTENTION
from cct_kernels.ops.linear import KERNELS as LINEAR

OP = "encoder_layer"
_FUSED_BACKEND = "cpu"


def encoder_layer(
    src: torch.Tensor, *, pre_norm_weight: torch.Tensor, pre_norm_bias: torch.Tensor, qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor, norm1_weight: torch.Tensor, norm1_bias: torch.Tensor,
    linear1_weight: torch.Tensor, linear1_bias: torch.Tensor, linear2_weight: torch.Tensor,
    linear2_bias: torch.Tensor, num_heads: int, scale: float | None = None, pre_norm_eps: float = 1e-5,
    norm1_eps: float = 1e-5, mask: torch.Tensor | None = None, attention_dropout_p: float = 0.0,
    dropout_p: float = 0.0, drop_path_rate: float = 0.0, backend: str | None = None,
) -> torch.Tensor:
    """The encoder block (in training with dropout_p, attention_dropout_p, drop_path_rate); see the module docstring
    for shapes, dtypes, limits and errors."""
    check_tensor("src", src, ndim=3, like_name="src")
    params, config = _checked(
        src, pre_norm_weight=pre_norm_weight, pre_norm_bias=pre_norm_bias, qkv_weight=qkv_weight,
        proj_weight=proj_weight, proj_bias=proj_bias, norm1_weight=norm1_weight, norm1_bias=norm1_bias,
        linear1_weight=linear1_weight, linear1_bias=linear1_bias, linear2_weight=linear2_weight,
        linear2_bias=linear2_bias, num_heads=num_heads, scale=scale, pre_norm_eps=pre_norm_eps, norm1_eps=norm1_eps,
        attention_dropout_p=attention_dropout_p, dropout_p=dropout_p, drop_path_rate=drop_path_rate)
    if _runs_fused(src, [params], [config], mask, backend):
        # The extension's C++ op itself (its fake: extension/encoder_layer.py), also under torch.compile, where the
        # graph then calls it with no Python in between.
        return backends.kernel_module(_FUSED_BACKEND, OP).forward(
            src.contiguous(), *(t.contiguous() for t in params.values()), config.num_heads, config.scale,
            config.pre_norm_eps, config.norm1_eps)
    return _unfused(src, params, config, mask, backend)


def encoder_layers(
    src: torch.Tensor, layers: Sequence[Mapping[str, Any]], *, mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Blocks in sequence: encoder_layer(... encoder_layer(src, **layers[0], ...) ..., **layers[-1], ...), each layer
    a dict of encoder_layer's keyword arguments other than mask and backend (the same mask and backend for every
    layer). Equal to those calls to the bit. Where the fused kernel serves every layer (see the module docstring),
    one C++ call runs them all: at batch 1 the Python between the blocks' calls cost ~0.1-0.2 ms a block (NOTES.md,
    cpu extension, eighth round). An empty list returns src. Errors: those of encoder_layer, the message prefixed
    with the layer's index (`layers[3]: ...`); TypeError for layers not a list or tuple of dicts, or an unknown
    keyword."""
    check_tensor("src", src, ndim=3, like_name="src")
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"layers must be a list or tuple of dicts of encoder_layer's arguments, got "
                        f"{type(layers).__name__}")
    checked = []
    for index, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            raise TypeError(f"layers[{index}] must be a dict of encoder_layer's arguments, got {type(layer).__name__}")
        try:
            checked.append(_checked(src, **layer))
        except (TypeError, ValueError) as error:
            raise type(error)(f"layers[{index}]: {error}") from None
    if not checked:
        return src
    params, configs = [p for p, _ in checked], [c for _, c in checked]
    if _runs_fused(src, params, configs, mask, backend):
        return backends.kernel_module(_FUSED_BACKEND, OP).forward_layers(
            src.contiguous(), [t.contiguous() for p in params for t in p.values()],
            [c.num_heads for c in configs], [c.scale for c in configs], [c.pre_norm_eps for c in configs],
            [c.norm1_eps for c in configs])
    shared = {}  # what the first blocks work out for the others (see _unfused)
    for layer_params, config in checked:
        src = _unfused(src, layer_params, config, mask, backend, shared)
    return src


def _checked(
    src, *, pre_norm_weight, pre_norm_bias, qkv_weight, proj_weight, proj_bias, norm1_weight, norm1_bias,
    linear1_weight, linear1_bias, linear2_weight, linear2_bias, num_heads, scale=None, pre_norm_eps=1e-5,
    norm1_eps=1e-5, attention_dropout_p=0.0, dropout_p=0.0, drop_path_rate=0.0,
) -> tuple[dict[str, torch.Tensor], _Config]:
    """One block's arguments checked against src (checked itself): ({name: parameter} in the kernels' order,
    config)."""
    dim = src.shape[-1]
    check_int("num_heads", num_heads, 1)
    if dim % num_heads:
        raise ValueError(f"num_heads ({num_heads}) must divide src's last dim D = {dim}")
    like = None if torch.is_autocast_enabled(src.device.type) else src  # under autocast the ops cast their inputs
    check_tensor("linear1_weight", linear1_weight, ndim=2, like=like, like_name="src")
    hidden = linear1_weight.shape[0]
    params = {  # in _forward's order
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
    config = _Config(
        num_heads, scale, check_real("pre_norm_eps", pre_norm_eps, "positive", is_positive_finite),
        check_real("norm1_eps", norm1_eps, "positive", is_positive_finite),
        check_real("attention_dropout_p", attention_dropout_p, "in [0, 1)", lambda p: 0.0 <= p < 1.0),
        check_real("dropout_p", dropout_p, "in [0, 1]", lambda p: 0.0 <= p <= 1.0),
        check_real("drop_path_rate", drop_path_rate, "in [0, 1]", lambda p: 0.0 <= p <= 1.0))
    return {name: tensor for name, (tensor, _) in params.items()}, config


def _unfused(src, params, config, mask, backend, shared=None):
    """The block where the fused kernel does not serve it: one autograd node on kernel backends, else op by op.
    shared: what earlier blocks of the same encoder_layers call worked out, for the blocks after them: the mask's
    key padding (checking a CUDA mask costs a host sync) and the backend choices by shape (see _Block)."""
    shared = {} if shared is None else shared
    tensors = list(params.values())
    if not traced((src, *tensors, mask)):
        # contiguous before the backends are selected, as the ops hand them over; src is cast per use, in run(),
        # as the ops cast it
        tensors = [t.contiguous() for t in autocast_inputs(*tensors)]
        if "padding" not in shared:
            shared["padding"] = key_padding(mask, src.shape[0], src.shape[1], src.device)
        padding = shared["padding"]
        if padding is None or padding.lengths is not None:
            block = _Block(src, dict(zip(params, tensors)), config, None if padding is None else padding.lengths,
                           backend, shared.setdefault("selections", {}))
            if block.backends is not None:
                return block.run()
    return _op_by_op(src, dict(zip(params, tensors)), config, mask, backend)


@dataclass(frozen=True)
class _Config:
    num_heads: int
    scale: float
    pre_norm_eps: float
    norm1_eps: float
    attention_dropout_p: float
    dropout_p: float
    drop_path_rate: float


def drop_path_scale(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Stochastic depth's factor per sample of x (B, ...), drawn as the official drop_path draws its mask: 0 or
    1 / (1 - drop_prob), shaped (B, N) for x (B, N, D), ready to be ops.linear's row_scale."""
    keep_prob = 1 - drop_prob
    mask = (keep_prob + torch.rand((x.shape[0],), dtype=x.dtype, device=x.device)).floor_()
    scale = mask if keep_prob == 0.0 else mask / keep_prob
    return scale.view(-1, *(1,) * (x.ndim - 2)).expand(x.shape[:-1])


def _row_scale(src, config):
    return drop_path_scale(src, config.drop_path_rate) if config.drop_path_rate > 0 else None


def _op_by_op(src, p, config, mask, backend):
    """The block as its ops, each checking, selecting a backend and recording autograd on its own."""
    heads = ops.attention(
        ops.linear(src, p["qkv_weight"], input_norm_weight=p["pre_norm_weight"], input_norm_bias=p["pre_norm_bias"],
                   input_norm_eps=config.pre_norm_eps, backend=backend),
        config.num_heads, scale=config.scale, dropout_p=config.attention_dropout_p, mask=mask, backend=backend)
    stream = ops.linear(heads, p["proj_weight"], p["proj_bias"], residual=src, row_scale=_row_scale(src, config),
                        dropout_p=config.dropout_p, norm_weight=p["norm1_weight"], norm_bias=p["norm1_bias"],
                        norm_eps=config.norm1_eps, backend=backend)
    mlp = ops.linear(stream, p["linear1_weight"], p["linear1_bias"], activation="gelu", dropout_p=config.dropout_p,
                     backend=backend)
    return ops.linear(mlp, p["linear2_weight"], p["linear2_bias"], residual=stream,
                      row_scale=_row_scale(src, config), dropout_p=config.dropout_p, backend=backend)


def _standin(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape` with like's dtype and device, for asking a backend whether it
    serves an intermediate before it exists (the kernel modules' unsupported() read shapes, dtypes, devices and
    strides, never values; the memory is never touched)."""
    return like.new_empty(shape)


class _Block:
    """One call's block on kernel backends: the five op calls' backends (selected as the ops select them, or None
    when one of them would run eager), then the kernels through _BlockFunction.

    selections: backends chosen for earlier blocks of the same encoder_layers call, keyed by what the choice reads
    (shapes, dtypes, the attention's arguments; the parameters are contiguous, and the backend context, the mask and
    the device are the call's): the stack's blocks, alike, are selected once (~35 µs of host time a block)."""

    def __init__(self, src, params, config, lengths, backend, selections):
        self.src, self.params, self.config, self.lengths = src, params, config, lengths
        key = (src.shape, src.dtype, *((t.shape, t.dtype) for t in params.values()), config.num_heads, config.scale,
               config.attention_dropout_p)
        if key not in selections:
            selections[key] = self._select(backend)
        self.backends = selections[key]

    def _select(self, backend):
        """The five calls' backends, or None when one would run eager."""
        src, params, config, lengths = self.src, self.params, self.config, self.lengths
        batch, tokens, dim = src.shape
        rows, hidden = batch * tokens, params["linear1_weight"].shape[0]
        weight = params["qkv_weight"]  # in the dtype the block computes in (src's, or autocast's)
        rows_d = _standin(weight, rows, dim)
        names = (
            backends.select("linear", backend, src.device, rows_d, params["qkv_weight"], None, None, "none", None,
                            params["pre_norm_weight"]),
            backends.select("attention", backend, src.device, _standin(weight, batch, tokens, 3 * dim),
                            config.num_heads, config.scale, config.attention_dropout_p, lengths),
            backends.select("linear", backend, src.device, rows_d, params["proj_weight"], params["proj_bias"],
                            rows_d, "none", params["norm1_weight"], None),
            backends.select("linear", backend, src.device, rows_d, params["linear1_weight"],
                            params["linear1_bias"], None, "gelu", None, None),
            backends.select("linear", backend, src.device, _standin(weight, rows, hidden), params["linear2_weight"],
                            params["linear2_bias"], rows_d, "none", None, None),
        )
        return None if "eager" in names else names

    def run(self) -> torch.Tensor:
        """The block's output, recorded as one autograd node when a gradient is needed."""
        src, config = self.src, self.config

        def seed(rate):
            return new_seed(src.device) if rate > 0 else None

        def row_scale():  # drawn in src's dtype, then cast, as ops.linear casts the block's row_scale
            scale = _row_scale(src, config)
            return None if scale is None else autocast_inputs(scale)[0].reshape(-1).contiguous()

        # the random draws, in the op-by-op block's order
        attention_seed = seed(config.attention_dropout_p)
        if attention_seed is None:
            attention_seed = src.new_empty(0, dtype=torch.int64)
        proj_scale = row_scale()
        proj_seed, linear1_seed = seed(config.dropout_p), seed(config.dropout_p)
        linear2_scale = row_scale()
        draws = _Draws(attention_seed, proj_scale, proj_seed, linear1_seed, linear2_scale, seed(config.dropout_p))
        # src twice, cast for each use under autocast as qkv's and proj's ops cast it (autograd then sums the two
        # gradients in src's dtype, as for the op-by-op block); the same tensor otherwise
        tensors = (*autocast_inputs(src), *autocast_inputs(src),
                   *self.params.values())
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return _BlockFunction.apply(self, draws, *tensors)
        return _forward(self, draws, *tensors, save_for_backward=False)[0]


@dataclass(frozen=True)
class _Draws:
    """One call's random draws: the dropout seeds and the stochastic depth row scales (M,), None when inactive."""
    attention_seed: torch.Tensor
    proj_scale: torch.Tensor | None
    proj_seed: torch.Tensor | None
    linear1_seed: torch.Tensor | None
    linear2_scale: torch.Tensor | None
    linear2_seed: torch.Tensor | None


def _forward(block, draws, src, residual, pre_norm_weight, pre_norm_bias, qkv_weight, proj_weight, proj_bias,
             norm1_weight, norm1_bias, linear1_weight, linear1_bias, linear2_weight, linear2_bias, *,
             save_for_backward):
    """The block's five kernel calls, with the arguments the ops would pass (src feeds qkv, residual is proj's
    residual: the same tensor, or src cast twice under autocast): (out (B, N, D), each call's context for its
    backward formula)."""
    config = block.config
    qkv_backend, attention_backend, proj_backend, linear1_backend, linear2_backend = block.backends
    batch, tokens, dim = src.shape
    rows, residual_rows = src.reshape(-1, dim).contiguous(), residual.reshape(-1, dim).contiguous()
    no_norm = (None, None, 1e-5)
    (qkv, *_), qkv_step = LINEAR.run_recorded(
        rows, qkv_weight, None, None, "none", save_for_backward, qkv_backend, None, 0.0, None, *no_norm,
        pre_norm_weight, pre_norm_bias, config.pre_norm_eps)
    (heads, _), attention_step = ATTENTION.run_recorded(
        qkv.view(batch, tokens, 3 * dim), config.num_heads, config.scale, config.attention_dropout_p,
        draws.attention_seed, attention_backend, block.lengths)
    (stream, *_), proj_step = LINEAR.run_recorded(
        heads.view(-1, dim), proj_weight, proj_bias, residual_rows, "none", save_for_backward, proj_backend,
        draws.proj_scale, config.dropout_p, draws.proj_seed, norm1_weight, norm1_bias, config.norm1_eps, *no_norm)
    (mlp, *_), linear1_step = LINEAR.run_recorded(
        stream, linear1_weight, linear1_bias, None, "gelu", save_for_backward, linear1_backend, None,
        config.dropout_p, draws.linear1_seed, *no_norm, *no_norm)
    (out, *_), linear2_step = LINEAR.run_recorded(
        mlp, linear2_weight, linear2_bias, stream, "none", save_for_backward, linear2_backend, draws.linear2_scale,
        config.dropout_p, draws.linear2_seed, *no_norm, *no_norm)
    return out.view(batch, tokens, dim), (qkv_step, attention_step, proj_step, linear1_step, linear2_step)


class _BlockFunction(torch.autograd.Function):
    """The block as one autograd node: the forward runs the five kernel calls, the backward their ops' backward
    formulas in reverse (the residual stream inside the block gets its two gradients summed, as autograd would sum
    them; src, an input twice, gets them summed by autograd itself). The five calls' saved tensors are released
    together when the node's backward ends (autograd would release each call's after its own backward): one
    block's activations at most are held a little longer."""

    @staticmethod
    def forward(ctx, block, draws, *tensors):
        out, ctx.steps = _forward(block, draws, *tensors, save_for_backward=True)
        ctx.save_for_backward(*tensors)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ctx.saved_tensors  # noqa: B018 - autograd's check that no input changed in place since the forward
        qkv_step, attention_step, proj_step, linear1_step, linear2_step = ctx.steps
        batch, tokens, dim = grad_out.shape
        # `grad` is the gradient flowing back through the block, rebound at each step so that each one is freed
        # once used, as autograd frees them between nodes
        grad, grad_linear2_weight, grad_linear2_bias, grad_stream = LINEAR.formula(
            linear2_step, grad_out.reshape(-1, dim), None, None, None)[:4]
        grad, grad_linear1_weight, grad_linear1_bias = LINEAR.formula(linear1_step, grad, None, None, None)[:3]
        grad = grad + grad_stream
        del grad_stream
        # ops.linear's gradients: (x, weight, bias, residual, 6 constants, norm weight and bias, norm_eps,
        # input norm weight and bias, input_norm_eps)
        (grad, grad_proj_weight, grad_proj_bias, grad_residual, *_, grad_norm1_weight, grad_norm1_bias,
         _, _, _, _) = LINEAR.formula(proj_step, grad, None, None, None)
        grad = ATTENTION.formula(attention_step, grad.view(batch, tokens, dim), None)[0]
        grad_src, grad_qkv_weight, *_, grad_pre_norm_weight, grad_pre_norm_bias, _ = LINEAR.formula(
            qkv_step, grad.view(-1, 3 * dim), None, None, None)
        return (None, None, grad_src.view(batch, tokens, dim), grad_residual.view(batch, tokens, dim),
                grad_pre_norm_weight, grad_pre_norm_bias, grad_qkv_weight, grad_proj_weight, grad_proj_bias,
                grad_norm1_weight, grad_norm1_bias, grad_linear1_weight, grad_linear1_bias, grad_linear2_weight,
                grad_linear2_bias)


def _runs_fused(src, params, configs, mask, backend) -> bool:
    """Whether the fused kernel serves these blocks (params and configs one per block): asked for (cpu) or allowed
    (auto), and able to: no mask, autocast, random draws or gradient to record."""
    if (backends.requested_backend(backend) not in ("auto", _FUSED_BACKEND) or mask is not None
            or torch._C._are_functorch_transforms_active()):  # the ops one by one then say what serves (select)
        return False
    if torch.is_autocast_enabled(src.device.type) or any(
            c.attention_dropout_p > 0 or c.dropout_p > 0 or c.drop_path_rate > 0 for c in configs):
        return False
    if torch.is_grad_enabled() and (src.requires_grad or any(t.requires_grad for p in params for t in p.values())):
        return False
    return backends.unsupported_reason(_FUSED_BACKEND, OP, src.device, src, mask) is None

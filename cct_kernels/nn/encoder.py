"""The CCT encoder block: official order, where norm1 overwrites the residual stream after attention."""
from __future__ import annotations

import torch
from torch import nn

from cct_kernels import backends, ops
from cct_kernels.nn._backend import UsesBackend
from cct_kernels.nn._checks import check_int, check_probability
from cct_kernels.nn.attention import Attention, active_rate
from cct_kernels.ops.encoder_layer import drop_path_scale


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: zero whole samples with probability drop_prob (in [0, 1]), scale the rest
    by 1 / (1 - drop_prob). drop_prob 1 drops every sample: the result is zero (not 0/0)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = (keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
    if keep_prob == 0.0:
        return x * mask  # all zeros, still in the graph (zero gradients, so DDP sees every parameter used)
    return x.div(keep_prob) * mask


class DropPath(nn.Module):
    """drop_path as a module: active in training mode only. drop_prob must be in [0, 1]."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = check_probability("drop_prob", drop_prob)

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class TransformerEncoderLayer(UsesBackend, nn.Module):
    """(B, N, d_model) -> (B, N, d_model). Sizes are ints >= 1 (d_model a multiple of nhead), rates in [0, 1].

    The official function as one ops.encoder_layer call (in training too: one autograd node on kernel backends),
    whose four linears run by ops.linear: pre_norm is in qkv's prologue; linear1's GELU, the dropouts, the two
    residual adds, stochastic depth (as a per-sample row scale) and norm1 (after proj's residual add) are in their
    linear's epilogue. The block runs as its modules' ops instead where the op would not compute the modules'
    function (see _block_arguments). On the eager backend, with both dropout and stochastic depth active, the
    residual linears keep the official modules' order of random draws (dropout's mask, then drop_path's), so the
    oracle draws what the official model draws.
    """

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, attention_dropout=0.1, drop_path_rate=0.1):
        super().__init__()
        check_int("dim_feedforward", dim_feedforward, 1)
        check_probability("dropout", dropout)
        check_probability("drop_path_rate", drop_path_rate)
        self.pre_norm = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, nhead, attention_dropout, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, src, mask=None):
        block = self._block_arguments()
        if block is not None:
            return ops.encoder_layer(src, **block, mask=mask, backend=self.backend)
        pre_norm, norm1 = self._modules["pre_norm"], self._modules["norm1"]
        if self._official_draw_order(self.self_attn.proj_drop):
            src = norm1(src + self.drop_path(self.self_attn(pre_norm(src), mask)))
        else:
            # the norms in qkv's prologue and proj's epilogue unless they must run as modules: hooks, or a
            # TorchScript/ONNX trace (which records them as LayerNorm nodes, as the official model exports)
            fusable = not _global_module_hooks() and not torch.jit.is_tracing()
            fuse_pre_norm, fuse_norm1 = (fusable and plain_layer_norm(norm) for norm in (pre_norm, norm1))
            heads = self.self_attn.attend(src if fuse_pre_norm else pre_norm(src), mask,
                                          norm=pre_norm if fuse_pre_norm else None)
            # drawn after attention's dropout, in the official order of random draws
            src = self.self_attn.project(heads, residual=src, row_scale=self._row_scale(src),
                                         norm=norm1 if fuse_norm1 else None)
            if not fuse_norm1:
                src = norm1(src)
        hidden = ops.linear(src, self.linear1.weight, self.linear1.bias, activation="gelu",
                            dropout_p=active_rate(self.dropout1), backend=self.backend)
        if self._official_draw_order(self.dropout2):
            return src + self.drop_path(self._linear2(hidden))
        return self._linear2(hidden, residual=src, row_scale=self._row_scale(src))

    def _linear2(self, hidden, residual=None, row_scale=None):
        return ops.linear(hidden, self.linear2.weight, self.linear2.bias, residual=residual, row_scale=row_scale,
                          dropout_p=active_rate(self.dropout2), backend=self.backend)

    def _block_arguments(self) -> dict | None:
        """ops.encoder_layer's keyword arguments for this block's function in this call, or None when the op would
        not compute it: parameters other than the official ones (a qkv bias, non-affine or multi-dim LayerNorms,
        replaced submodules), dropout modules at different rates, a forward hook that running the norms as modules
        would fire, a TorchScript/ONNX trace (which records the block's ops: the fused op has no ONNX symbolic), or
        the eager backend's official order of random draws. Read straight from the module dicts: this runs on every
        call, where nn.Module's attribute lookup cost ~20 us a block."""
        if torch.jit.is_tracing() or _global_module_hooks():
            return None
        modules = self._modules
        pre_norm, norm1, attn = modules["pre_norm"], modules["norm1"], modules["self_attn"]
        linear1, linear2 = modules["linear1"], modules["linear2"]
        if type(attn) is not Attention:
            return None
        qkv, proj = attn._modules["qkv"], attn._modules["proj"]
        if not (plain_layer_norm(pre_norm) and plain_layer_norm(norm1)):
            return None
        if any(type(m) is not nn.Linear for m in (qkv, proj, linear1, linear2)) or qkv._parameters["bias"] is not None:
            return None
        arguments = {
            "pre_norm_weight": pre_norm._parameters["weight"], "pre_norm_bias": pre_norm._parameters["bias"],
            "qkv_weight": qkv._parameters["weight"], "proj_weight": proj._parameters["weight"],
            "proj_bias": proj._parameters["bias"], "norm1_weight": norm1._parameters["weight"],
            "norm1_bias": norm1._parameters["bias"], "linear1_weight": linear1._parameters["weight"],
            "linear1_bias": linear1._parameters["bias"], "linear2_weight": linear2._parameters["weight"],
            "linear2_bias": linear2._parameters["bias"],
        }
        if any(p is None for p in arguments.values()):
            return None
        dropout_p = active_rate(attn._modules["proj_drop"])
        if any(active_rate(modules[name]) != dropout_p for name in ("dropout1", "dropout2")):
            return None
        if self._official_draw_order(modules["dropout2"]):
            return None
        drop_path = modules["drop_path"]
        return {**arguments, "num_heads": attn.num_heads, "scale": attn.scale, "pre_norm_eps": pre_norm.eps,
                "norm1_eps": norm1.eps, "attention_dropout_p": active_rate(attn._modules["attn_drop"]),
                "dropout_p": dropout_p,
                "drop_path_rate": drop_path.drop_prob if self.training and isinstance(drop_path, DropPath) else 0.0}

    def _official_draw_order(self, dropout: nn.Dropout) -> bool:
        """Whether stochastic depth must be drawn after `dropout`'s mask, as a separate step (not the linear's row
        scale, drawn before the linear runs): on the eager backend, when both draw in this call."""
        return (active_rate(dropout) > 0 and isinstance(self.drop_path, DropPath) and self.training
                and backends.requested_backend(self.backend) == "eager")

    def _row_scale(self, src):
        """Stochastic depth as the residual linear's row_scale (None when inactive: eval mode or rate 0)."""
        if not self.training or not isinstance(self.drop_path, DropPath):
            return None
        return drop_path_scale(src, self.drop_path.drop_prob)


def plain_layer_norm(norm: nn.Module) -> bool:
    """Whether `norm` is an nn.LayerNorm over the last dim with a weight and no hooks of its own: a kernel that
    applies F.layer_norm with its parameters computes what calling it would."""
    return (type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1 and norm.weight is not None
            and not norm._forward_hooks and not norm._forward_pre_hooks)


def _global_module_hooks() -> bool:
    """Whether torch.nn.modules.module.register_module_forward_(pre_)hook hooks are installed."""
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)

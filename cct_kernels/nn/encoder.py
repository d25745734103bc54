"""The CCT encoder block: official order, where norm1 overwrites the residual stream after attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cct_kernels import backends, ops
from cct_kernels.nn._backend import UsesBackend
from cct_kernels.nn._checks import check_int, check_probability
from cct_kernels.nn._fusable import fusable
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
    linear's epilogue. The block runs as its ops one by one where the op would not compute the modules' function
    (see _block_arguments), and as the official module-by-module forward where a submodule is replaced (a LoRA or
    quantized linear) or hooked, or where hooks for every module are installed (nn/_fusable.py), and on the eager
    backend with both dropout and stochastic depth active, so that the oracle draws the official modules' random
    numbers in their order (dropout's mask, then drop_path's).
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
        if self._runs_official():
            return self._official_forward(src, mask)
        block = self._block_arguments()
        if block is not None:
            return ops.encoder_layer(src, **block, mask=mask, backend=self.backend)
        # Op by op, for what ops.encoder_layer does not take (a qkv bias, a LayerNorm without a weight or over more
        # dims, dropouts at different rates, a TorchScript/ONNX trace): the norms in qkv's prologue and proj's
        # epilogue unless they must run as modules (a trace records them as LayerNorm nodes, as the official model
        # exports).
        pre_norm, norm1 = self._modules["pre_norm"], self._modules["norm1"]
        tracing = torch.jit.is_tracing()
        fuse_pre_norm, fuse_norm1 = (not tracing and plain_layer_norm(norm) for norm in (pre_norm, norm1))
        heads = self.self_attn.attend(src if fuse_pre_norm else pre_norm(src), mask,
                                      norm=pre_norm if fuse_pre_norm else None)
        # drawn after attention's dropout, in the official order of random draws
        src = self.self_attn.project(heads, residual=src, row_scale=self._row_scale(src),
                                     norm=norm1 if fuse_norm1 else None)
        if not fuse_norm1:
            src = norm1(src)
        hidden = ops.linear(src, self.linear1.weight, self.linear1.bias, activation="gelu",
                            dropout_p=active_rate(self.dropout1), backend=self.backend)
        return ops.linear(hidden, self.linear2.weight, self.linear2.bias, residual=src,
                          row_scale=self._row_scale(src), dropout_p=active_rate(self.dropout2), backend=self.backend)

    def layer_arguments(self) -> dict | None:
        """ops.encoder_layer's keyword arguments (but mask and backend) when this block's forward is that op call in
        this call, else None (a submodule replaced or hooked, the eager backend's official draw order, what the op
        does not take: see _block_arguments). The classifier runs its blocks as one ops.encoder_layers call with
        them."""
        return None if self._runs_official() else self._block_arguments()

    def _runs_official(self) -> bool:
        """Whether this call takes the official module-by-module forward: a submodule replaced or hooked, or the
        eager backend's official draw order (checked second: it reads the dropouts' rates, which the first ensures
        are nn.Dropout's)."""
        return not self._fusable_children() or self._official_draw_order()

    def _official_forward(self, src, mask):
        """The official forward, every submodule called as a module: for replaced or hooked submodules (see
        nn/_fusable.py), and for the eager backend's official order of random draws."""
        src = src + self.drop_path(self.self_attn(self.pre_norm(src), mask))
        src = self.norm1(src)
        src2 = self.linear2(self.dropout1(F.gelu(self.linear1(src))))
        return src + self.drop_path(self.dropout2(src2))

    def _fusable_children(self) -> bool:
        """Whether every submodule is the stock class with no hooks (global ones included), so the fused paths
        compute what calling them would."""
        modules = self._modules
        attn = modules["self_attn"]
        return (fusable(attn, Attention) and attn.fusable_children()
                and all(fusable(modules[name], nn.LayerNorm) for name in ("pre_norm", "norm1"))
                and all(fusable(modules[name], nn.Linear) for name in ("linear1", "linear2"))
                and all(fusable(modules[name], nn.Dropout, nn.Identity) for name in ("dropout1", "dropout2"))
                and fusable(modules["drop_path"], DropPath, nn.Identity))

    def _block_arguments(self) -> dict | None:
        """ops.encoder_layer's keyword arguments for this block's function in this call (its submodules fusable), or
        None when the op would not compute it: parameters other than the official ones (a qkv bias, LayerNorms
        without a weight or over more dims), dropout modules at different rates, or a TorchScript/ONNX trace (which
        records the block's ops: the fused op has no ONNX symbolic). Read straight from the module dicts: this runs
        on every call, where nn.Module's attribute lookup cost ~20 us a block."""
        if torch.jit.is_tracing():
            return None
        modules = self._modules
        pre_norm, norm1, attn = modules["pre_norm"], modules["norm1"], modules["self_attn"]
        linear1, linear2 = modules["linear1"], modules["linear2"]
        qkv, proj = attn._modules["qkv"], attn._modules["proj"]
        if not (plain_layer_norm(pre_norm) and plain_layer_norm(norm1)) or qkv._parameters["bias"] is not None:
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
        drop_path = modules["drop_path"]
        return {**arguments, "num_heads": attn.num_heads, "scale": attn.scale, "pre_norm_eps": pre_norm.eps,
                "norm1_eps": norm1.eps, "attention_dropout_p": active_rate(attn._modules["attn_drop"]),
                "dropout_p": dropout_p,
                "drop_path_rate": drop_path.drop_prob if self.training and isinstance(drop_path, DropPath) else 0.0}

    def _official_draw_order(self) -> bool:
        """Whether stochastic depth must be drawn after the dropouts' masks, each a step of its own (the official
        modules' order), rather than as the residual linears' row scale, drawn before they run: on the eager
        backend, when both draw in this call."""
        if not (self.training and isinstance(self._modules["drop_path"], DropPath)
                and backends.requested_backend(self.backend) == "eager"):
            return False
        return active_rate(self._modules["self_attn"]._modules["proj_drop"]) > 0 or active_rate(self.dropout2) > 0

    def _row_scale(self, src):
        """Stochastic depth as the residual linear's row_scale (None when inactive: eval mode or rate 0)."""
        if not self.training or not isinstance(self.drop_path, DropPath):
            return None
        return drop_path_scale(src, self.drop_path.drop_prob)


def plain_layer_norm(norm: nn.LayerNorm) -> bool:
    """Whether fusable LayerNorm `norm` normalises the last dim with a weight: what the kernels' LayerNorms apply."""
    return len(norm.normalized_shape) == 1 and norm.weight is not None

"""The CCT encoder block: official order, where norm1 overwrites the residual stream after attention."""
from __future__ import annotations

import torch
from torch import nn

from cct_kernels import ops
from cct_kernels.nn._backend import UsesBackend
from cct_kernels.nn._checks import check_int, check_probability
from cct_kernels.nn.attention import Attention


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

    The official function, with the four linears run by ops.linear: linear1's GELU and the two residual adds are
    fused into their linear's epilogue (the residual ones whenever no dropout or stochastic depth runs in between:
    eval mode, or zero rates).
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
        if self._random_between_linear_and_residual():
            src = src + self.drop_path(self.self_attn(self.pre_norm(src), mask))
        else:
            src = self.self_attn(self.pre_norm(src), mask, residual=src)
        src = self.norm1(src)
        hidden = ops.linear(src, self.linear1.weight, self.linear1.bias, activation="gelu", backend=self.backend)
        hidden = self.dropout1(hidden)
        if self._random_between_linear_and_residual(self.dropout2):
            return src + self.drop_path(self.dropout2(self._linear2(hidden)))
        return self._linear2(hidden, residual=src)

    def _linear2(self, hidden, residual=None):
        return ops.linear(hidden, self.linear2.weight, self.linear2.bias, residual=residual, backend=self.backend)

    def _random_between_linear_and_residual(self, dropout: nn.Dropout | None = None) -> bool:
        """Whether stochastic depth (or `dropout`) runs between a linear and its residual add in this call."""
        if not self.training:
            return False
        return isinstance(self.drop_path, DropPath) or (dropout is not None and dropout.p > 0)

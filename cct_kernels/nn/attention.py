"""Multi-head self-attention with the official parameter names (qkv without bias, proj with bias)."""
from __future__ import annotations

from torch import nn

from cct_kernels import ops
from cct_kernels.nn._backend import UsesBackend
from cct_kernels.nn._checks import check_heads, check_int, check_probability
from cct_kernels.nn._fusable import fusable, global_hooks


class Attention(UsesBackend, nn.Module):
    """(B, N, dim) -> (B, N, dim). dim and num_heads are ints >= 1 with dim a multiple of num_heads; the dropout
    rates are in [0, 1], attention_dropout in [0, 1) (ValueError / TypeError otherwise)."""

    def __init__(self, dim, num_heads=8, attention_dropout=0.1, projection_dropout=0.1):
        super().__init__()
        check_int("dim", dim, 1)
        check_int("num_heads", num_heads, 1)
        check_heads("dim", dim, "num_heads", num_heads)
        check_probability("attention_dropout", attention_dropout, one_allowed=False)  # the op takes p < 1
        check_probability("projection_dropout", projection_dropout)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.attn_drop = nn.Dropout(attention_dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(projection_dropout)

    def forward(self, x, mask=None):
        """x (B, N, dim); mask None or (B, N) bool, True = real token (key padding, text models). With qkv, proj or
        proj_drop replaced or hooked (see nn/_fusable.py) they are called as modules, in the official order."""
        if self.fusable_children():
            return self.project(self.attend(x, mask))
        heads = ops.attention(self.qkv(x), self.num_heads, scale=self.scale, dropout_p=active_rate(self.attn_drop),
                              mask=mask, backend=self.backend)
        return self.proj_drop(self.proj(heads))

    def fusable_children(self) -> bool:
        """Whether attend/project compute what calling qkv, proj and proj_drop would (global hooks aside). attn_drop
        is applied by the attention kernels to probabilities they never store, so a hook on it cannot fire."""
        modules = self._modules
        return (fusable(modules["qkv"], nn.Linear) and fusable(modules["proj"], nn.Linear)
                and fusable(modules["proj_drop"], nn.Dropout, nn.Identity) and not global_hooks())

    def attend(self, x, mask=None, norm: nn.LayerNorm | None = None):
        """The heads' outputs (B, N, dim) before the output projection: qkv (of norm(x) when a LayerNorm over the
        last dim is given, in the linear's prologue), then attention."""
        dropout_p = active_rate(self.attn_drop)
        norm_args = {} if norm is None else dict(input_norm_weight=norm.weight, input_norm_bias=norm.bias,
                                                 input_norm_eps=norm.eps)
        qkv = ops.linear(x, self.qkv.weight, self.qkv.bias, backend=self.backend, **norm_args)
        return ops.attention(qkv, self.num_heads, scale=self.scale, dropout_p=dropout_p, mask=mask,
                             backend=self.backend)

    def project(self, x, residual=None, row_scale=None, norm: nn.LayerNorm | None = None):
        """norm(proj_drop(proj(x)) * row_scale + residual) (each optional; row_scale (B, N) is the caller's
        stochastic depth, norm a LayerNorm over the last dim), all in the projection's epilogue."""
        norm_args = {} if norm is None else dict(norm_weight=norm.weight, norm_bias=norm.bias, norm_eps=norm.eps)
        return ops.linear(x, self.proj.weight, self.proj.bias, residual=residual, row_scale=row_scale,
                          dropout_p=active_rate(self.proj_drop), backend=self.backend, **norm_args)


def active_rate(dropout: nn.Module) -> float:
    """The rate nn.Dropout `dropout` applies in this call: its p in training mode, else 0 (0 for nn.Identity)."""
    if isinstance(dropout, nn.Identity):
        return 0.0
    if not isinstance(dropout, nn.Dropout):
        raise TypeError(f"a fused op applies this dropout itself, so it must be nn.Dropout or nn.Identity, got "
                        f"{type(dropout).__name__}")
    return dropout.p if dropout.training else 0.0

"""Multi-head self-attention with the official parameter names (qkv without bias, proj with bias)."""
from __future__ import annotations

from torch import nn

from cct_kernels import ops
from cct_kernels.nn._backend import UsesBackend


class Attention(UsesBackend, nn.Module):
    def __init__(self, dim, num_heads=8, attention_dropout=0.1, projection_dropout=0.1):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.attn_drop = nn.Dropout(attention_dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(projection_dropout)

    def forward(self, x):
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = ops.attention(self.qkv(x), self.num_heads, scale=self.scale, dropout_p=dropout_p, backend=self.backend)
        return self.proj_drop(self.proj(x))

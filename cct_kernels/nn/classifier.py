"""The transformer classifier: positional embedding, encoder blocks, final norm, SeqPool or class token, fc."""
from __future__ import annotations

import torch
from torch import nn

from cct_kernels import ops, reference
from cct_kernels.nn._backend import UsesBackend
from cct_kernels.nn._checks import check_heads, check_int, check_probability, check_real
from cct_kernels.nn._fusable import fusable, global_hooks
from cct_kernels.nn.encoder import TransformerEncoderLayer
from cct_kernels.nn.positional import sinusoidal_embedding
from cct_kernels.ops._checks import key_padding

POSITIONAL_EMBEDDINGS = ("learnable", "sine", "none")


class TransformerClassifier(UsesBackend, nn.Module):
    """(B, N, D) tokens -> (B, num_classes) logits, with the official parameter names and init.

    seq_pool=True pools with SeqPool (CCT, CVT): `attention_pool` is the official nn.Linear(D, 1) scoring the
    tokens, and ops.seqpool computes the softmax-weighted sum from its parameters in one op (where attention_pool is
    replaced or hooked, it is called and the tokens pooled by its scores, as officially: nn/_fusable.py). False
    prepends a class token and reads it out (ViT-Lite).
    `sequence_length` is the token count the positional embedding is built for (tokens only, no class token).
    num_classes=0 means no head (timm's convention): `fc` is nn.Identity and the output is the pooled (B, D)
    features. Sizes are ints (embedding_dim, num_heads >= 1 with embedding_dim a multiple of num_heads;
    num_layers, num_classes >= 0), mlp_ratio > 0, rates in [0, 1] (attention_dropout in [0, 1)); anything else
    raises TypeError / ValueError.
    """

    def __init__(
        self, seq_pool=True, embedding_dim=768, num_layers=12, num_heads=12, mlp_ratio=4.0, num_classes=1000,
        dropout=0.1, attention_dropout=0.1, stochastic_depth=0.1, positional_embedding="learnable",
        sequence_length=None,
    ):
        super().__init__()
        check_int("embedding_dim", embedding_dim, 1)
        check_int("num_layers", num_layers, 0)
        check_int("num_heads", num_heads, 1)
        check_heads("embedding_dim", embedding_dim, "num_heads", num_heads)
        check_real("mlp_ratio", mlp_ratio, low=0.0, low_inclusive=False)
        if int(embedding_dim * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio ({mlp_ratio}) times embedding_dim ({embedding_dim}) must give a hidden "
                             f"size >= 1")
        check_int("num_classes", num_classes, 0)
        check_probability("dropout", dropout)
        check_probability("attention_dropout", attention_dropout, one_allowed=False)  # the attention op takes p < 1
        check_probability("stochastic_depth", stochastic_depth)
        if sequence_length is not None:
            check_int("sequence_length", sequence_length, 1)
        if not isinstance(positional_embedding, str) or positional_embedding not in POSITIONAL_EMBEDDINGS:
            raise ValueError(
                f"positional_embedding must be one of {POSITIONAL_EMBEDDINGS}, got {positional_embedding!r}"
            )
        if positional_embedding != "none" and sequence_length is None:
            raise ValueError(f"a {positional_embedding!r} positional embedding needs sequence_length")
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.seq_pool = seq_pool
        self.sequence_length = sequence_length
        num_positions = None if sequence_length is None else sequence_length + (0 if seq_pool else 1)

        if seq_pool:
            self.attention_pool = nn.Linear(embedding_dim, 1)
        else:
            self.class_emb = nn.Parameter(torch.zeros(1, 1, embedding_dim))
        if positional_embedding == "learnable":
            self.positional_emb = nn.Parameter(torch.zeros(1, num_positions, embedding_dim))
            nn.init.trunc_normal_(self.positional_emb, std=0.2)
        elif positional_embedding == "sine":
            self.positional_emb = nn.Parameter(sinusoidal_embedding(num_positions, embedding_dim), requires_grad=False)
        else:
            self.positional_emb = None
        self.dropout = nn.Dropout(dropout)
        rates = torch.linspace(0, stochastic_depth, num_layers).tolist()
        self.blocks = nn.ModuleList([
            TransformerEncoderLayer(
                embedding_dim, num_heads, int(embedding_dim * mlp_ratio), dropout, attention_dropout, rate
            )
            for rate in rates
        ])
        self.norm = nn.LayerNorm(embedding_dim)
        self.fc = nn.Linear(embedding_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weight)

    def positional_table(self) -> torch.Tensor:
        """The (1, tokens, D) positional embedding added to the tokens (class token included)."""
        return self.positional_emb

    def forward(self, x, mask=None):
        """x (B, N, D) tokens; mask (text models' key padding, see ops.attention) None, (B, N) bool with True for
        a real token, or (B,) lengths: attention to real keys only and SeqPool over real tokens only."""
        if not self.seq_pool:
            x = torch.cat((self.class_emb.expand(x.shape[0], -1, -1), x), dim=1)
            if mask is not None and mask.dtype == torch.bool:
                mask = torch.cat((mask.new_ones(mask.shape[0], 1), mask), dim=1)
            elif mask is not None:
                mask = mask + 1  # the class token is real, and the real tokens stay a prefix
        if self.positional_emb is not None:
            positional = self.positional_table()
            if x.shape[1] != positional.shape[1]:
                extra = "" if self.seq_pool else " (class token included)"
                raise ValueError(
                    f"the input gives {x.shape[1]} tokens{extra} but the positional embedding has "
                    f"{positional.shape[1]}: build the model for this input size, or resize the "
                    f"embedding with cct_kernels.load_checkpoint"
                )
            x = x + positional
        x = self.dropout(x)
        layers = self._layer_arguments()
        if layers is not None:
            x = ops.encoder_layers(x, layers, mask=mask, backend=self.backend)
        else:
            for block in self.blocks:
                x = block(x, mask)
        x = self.norm(x)
        x = self._pool(x, mask) if self.seq_pool else x[:, 0]
        return self.fc(x)

    def _layer_arguments(self) -> list[dict] | None:
        """Each block's ops.encoder_layer arguments when calling the blocks is that op call block after block (each
        block the stock class with no hooks, on this module's backend: TransformerEncoderLayer.layer_arguments), for
        one ops.encoder_layers call; else None."""
        layers = []
        for block in self.blocks:
            if not fusable(block, TransformerEncoderLayer) or block.backend != self.backend:
                return None
            arguments = block.layer_arguments()
            if arguments is None:
                return None
            layers.append(arguments)
        return layers

    def _pool(self, x, mask):
        """SeqPool: (B, N, D) -> (B, D), over real tokens only with a mask."""
        pool = self.attention_pool
        if fusable(pool, nn.Linear) and not global_hooks():
            return ops.seqpool(x, pool.weight, pool.bias, mask=mask, backend=self.backend)
        padding = key_padding(mask, x.shape[0], x.shape[1], x.device)
        return reference.pool_by_scores(pool(x), x, mask=None if padding is None else padding.mask)


def _init_weight(m: nn.Module):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

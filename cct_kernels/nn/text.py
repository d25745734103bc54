"""Text modules with the official parameter names: word embedder, 1-D convolutional tokenizer, masked classifier.

Token masks are (B, L) bool, True for a real token ((B,) integer lengths are accepted too). They follow the spec's
semantics (../shared/spec/text-cct.md): embeddings of padded positions are zeroed, the tokenizer's token mask is
the official `forward_mask` (a ones convolution of the mask with the conv's size/stride/padding, then the same max
pool, then > 0), attention sees real keys only, and SeqPool pools real tokens only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cct_kernels import ops
from cct_kernels.nn._backend import UsesBackend
from cct_kernels.nn._checks import check_int
from cct_kernels.nn._fusable import fusable_stage
from cct_kernels.nn.classifier import TransformerClassifier
from cct_kernels.nn.positional import sinusoidal_embedding
from cct_kernels.ops._checks import check_values_in_range, key_padding
from cct_kernels.ops.tokenize import output_size


def check_word_mask(mask, ids: torch.Tensor) -> torch.Tensor | None:
    """`mask` (None, a (B, L) bool tensor, or (B,) integer lengths) as a (B, L) bool mask for the token ids."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.is_floating_point():
        raise TypeError(f"mask must be a (B, L) bool tensor (True = real token) or (B,) integer lengths, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.dtype == torch.bool:  # used as it is: whether it keeps a prefix is asked once, of the token mask
        if mask.shape != ids.shape:
            raise ValueError(f"mask must have the token ids' shape {tuple(ids.shape)}, got {tuple(mask.shape)}")
        return mask.to(ids.device)
    return key_padding(mask.to(ids.device), ids.shape[0], ids.shape[1], ids.device).mask


def ops_mask(mask: torch.Tensor | None, known_prefix: bool = False) -> torch.Tensor | None:
    """A (B, N) bool token mask in the form the ops serve fastest: lengths when it keeps a prefix of each sequence
    (checked once here rather than by every op of every block; known_prefix=True: known to be one, from lengths
    through a tokenizer that keeps prefixes, so nothing is checked: no host sync, and torch.compile traces it)."""
    if mask is None:
        return None
    if known_prefix:
        return mask.sum(1)
    padding = key_padding(mask, mask.shape[0], mask.shape[1], mask.device)
    return padding.mask if padding.lengths is None else padding.lengths


class Embedder(nn.Module):
    """Token ids (B, L) -> word vectors (B, L, word_dim); rows of padded positions are zero."""

    def __init__(self, vocab_size: int = 100000, word_embedding_dim: int = 300, padding_idx: int | None = 1):
        super().__init__()
        vocab_size = check_int("vocab_size", vocab_size, 1)
        if padding_idx is not None and not 0 <= check_int("padding_idx", padding_idx, 0) < vocab_size:
            raise ValueError(f"padding_idx must be None or in [0, vocab_size={vocab_size}), got {padding_idx}")
        self.embeddings = nn.Embedding(vocab_size, check_int("word_embedding_dim", word_embedding_dim, 1),
                                       padding_idx=padding_idx)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_values_in_range("token ids", ids, 0, self.embeddings.num_embeddings)  # on a GPU, a device assert
        x = self.embeddings(ids)
        return x if mask is None else x * mask.unsqueeze(-1).to(x.dtype)


class TextTokenizer(UsesBackend, nn.Module):
    """(B, L, word_dim) -> (B, N, E): a conv spanning the whole word vector, stepping along the sequence, then
    activation and max pool along the sequence, as one op (cct_kernels.ops.text_tokenize). `conv_layers` holds the
    official Conv2d(1, E, (k, word_dim)), ReLU and MaxPool2d((pk, 1)) (or Identity) for their parameters and
    settings.
    """

    def __init__(
        self, kernel_size: int, stride: int, padding: int, pooling_kernel_size: int = 3, pooling_stride: int = 2,
        pooling_padding: int = 1, word_embedding_dim: int = 300, embedding_dim: int = 128, relu: bool = True,
        max_pool: bool = True,
    ):
        super().__init__()
        pool = (nn.MaxPool2d((pooling_kernel_size, 1), (pooling_stride, 1), (pooling_padding, 0))
                if max_pool else nn.Identity())
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, embedding_dim, (kernel_size, word_embedding_dim), (stride, 1), (padding, 0), bias=False),
            nn.ReLU() if relu else nn.Identity(),
            pool,
        )
        nn.init.kaiming_normal_(self.conv_layers[0].weight)

    def output_length(self, length: int) -> int:
        """Tokens produced from a sequence of `length` word vectors."""
        conv, _, pool = self.conv_layers
        length = output_size(length, conv.kernel_size[0], conv.stride[0], conv.padding[0])
        if isinstance(pool, nn.MaxPool2d):
            length = output_size(length, pool.kernel_size[0], pool.stride[0], pool.padding[0])
        return length

    def keeps_prefixes(self) -> bool:
        """Whether a word mask that is a prefix of each sequence gives a token mask that is one too: true when the
        first window of the conv (and of the pool) holds a real position, i.e. padding < kernel size; later windows
        only move right, so once a window holds no real word none after it does."""
        conv, _, pool = self.conv_layers
        pool_ok = not isinstance(pool, nn.MaxPool2d) or pool.padding[0] < pool.kernel_size[0]
        return conv.padding[0] < conv.kernel_size[0] and pool_ok

    def token_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) word mask -> (B, N) token mask: a token is real when its receptive field holds a real word."""
        conv, _, pool = self.conv_layers
        counts = F.conv1d(mask.unsqueeze(1).float(), mask.new_ones(1, 1, conv.kernel_size[0], dtype=torch.float),
                          stride=conv.stride[0], padding=conv.padding[0])
        if isinstance(pool, nn.MaxPool2d):
            counts = F.max_pool1d(counts, pool.kernel_size[0], pool.stride[0], pool.padding[0])
        return counts.squeeze(1) > 0

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        conv, activation, pool = self.conv_layers
        if fusable_stage(conv, activation, pool):
            pool_args = ((pool.kernel_size[0], pool.stride[0], pool.padding[0]) if isinstance(pool, nn.MaxPool2d)
                         else None)
            x = ops.text_tokenize(x, conv.weight, stride=conv.stride[0], padding=conv.padding[0],
                                  relu=isinstance(activation, nn.ReLU), pool=pool_args, backend=self.backend)
        else:  # replaced or hooked: called as modules (nn/_fusable.py), (B, E, N, 1) -> (B, N, E)
            x = self.conv_layers(x.unsqueeze(1)).squeeze(-1).transpose(1, 2)
        if mask is None:
            return x, None
        mask = self.token_mask(mask)
        return x * mask.unsqueeze(-1).to(x.dtype), mask


class MaskedTransformerClassifier(TransformerClassifier):
    """(B, N, E) tokens and a (B, N) token mask -> logits; the official text classifier's parameters.

    Its positional embedding has one leading row more than the tokens (class token included) need: the official
    "padding idx" row (zeros in the sine table). That row is skipped, so the sine positions are 0..N-1 as in the
    image models (the official forward adds the whole table and fails; see the spec).
    """

    def __init__(self, seq_len: int, positional_embedding: str = "sine", **classifier_args):
        super().__init__(sequence_length=seq_len + 1, positional_embedding=positional_embedding, **classifier_args)
        if positional_embedding == "sine":
            rows = self.positional_emb.shape[1]
            table = sinusoidal_embedding(rows - 1, self.embedding_dim)
            self.positional_emb.data = torch.cat([table.new_zeros(1, 1, self.embedding_dim), table], dim=1)
        self.sequence_length = seq_len

    def positional_table(self) -> torch.Tensor:
        return self.positional_emb[:, 1:]

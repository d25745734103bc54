"""The paper's text models (official src/text): TextCCT, TextCVT, TextViTLite, TextTransformerLite and the twelve
factories text_{cct,cvt,vit,transformer}_{2,4,6}, with the official constructor arguments and state_dict.

Called as model(token_ids, mask=None): token_ids (B, seq_len) int64, mask (B, seq_len) bool (True = real
token; None = all real). The official forward passes fail at their HEAD (shared/spec/text-cct.md); these
models compute the evident intent, a deliberate difference: padded words are zeroed, attention sees real tokens
only and SeqPool pools real tokens only, so a sentence's logits do not depend on how much padding follows it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from cct_kernels.models.factories import MODELS
from cct_kernels.nn import set_backend
from cct_kernels.nn.text import Embedder, MaskedTransformerClassifier, TextTokenizer, check_word_mask, ops_mask


class _TextModel(nn.Module):
    """embedder -> tokenizer (or none) -> masked classifier."""

    def __init__(self, tokenizer: TextTokenizer | None, seq_len, word_embedding_dim, embedding_dim, seq_pool,
                 vocab_size, padding_idx, backend, **classifier_args):
        super().__init__()
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        self.seq_len = seq_len
        self.embedder = Embedder(vocab_size, word_embedding_dim, padding_idx)
        if tokenizer is not None:
            self.tokenizer = tokenizer
            num_tokens = tokenizer.output_length(seq_len)
            if num_tokens < 1:
                raise ValueError(f"seq_len {seq_len} is too short for this tokenizer ({num_tokens} tokens)")
        else:
            num_tokens = seq_len
        self.classifier = MaskedTransformerClassifier(
            seq_len=num_tokens, seq_pool=seq_pool, embedding_dim=embedding_dim, **classifier_args
        )
        set_backend(self, backend)

    def set_backend(self, backend: str | None):
        """Use `backend` for every op of this model (None: follow use_backend / CCT_KERNELS_BACKEND / auto)."""
        return set_backend(self, backend)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise TypeError(f"token ids must be an integer tensor of shape (B, seq_len), got "
                            f"{getattr(ids, 'dtype', type(ids))} {tuple(getattr(ids, 'shape', ()))}")
        if ids.shape[1] != self.seq_len:
            raise ValueError(f"token ids have length {ids.shape[1]} but the model was built for seq_len="
                             f"{self.seq_len}: pad or truncate to it (padding masked out by `mask`)")
        prefix = mask is not None and mask.dtype != torch.bool  # lengths: the real words are a prefix
        mask = check_word_mask(mask, ids)
        x = self.embedder(ids, mask)
        if hasattr(self, "tokenizer"):
            x, mask = self.tokenizer(x, mask)
            prefix = prefix and self.tokenizer.keeps_prefixes()
        return self.classifier(x, ops_mask(mask, known_prefix=prefix))


def _classifier_args(num_layers, num_heads, mlp_ratio, num_classes, positional_embedding, dropout,
                     attention_dropout, stochastic_depth):
    return dict(num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
                positional_embedding=positional_embedding, dropout=dropout, attention_dropout=attention_dropout,
                stochastic_depth=stochastic_depth)


class TextCCT(_TextModel):
    """Text CCT: conv over the sequence (kernel (k, word_dim)) -> ReLU -> max pool -> masked encoder -> SeqPool."""

    def __init__(self, seq_len=64, word_embedding_dim=300, embedding_dim=256, kernel_size=2, stride=1, padding=1,
                 pooling_kernel_size=2, pooling_stride=2, pooling_padding=1, vocab_size=100000, padding_idx=1,
                 num_layers=14, num_heads=6, mlp_ratio=4.0, num_classes=1000, positional_embedding="sine",
                 dropout=0.0, attention_dropout=0.1, stochastic_depth=0.1, backend=None):
        tokenizer = TextTokenizer(kernel_size, stride, padding, pooling_kernel_size, pooling_stride, pooling_padding,
                                  word_embedding_dim, embedding_dim, relu=True, max_pool=True)
        super().__init__(tokenizer, seq_len, word_embedding_dim, embedding_dim, True, vocab_size, padding_idx,
                         backend, **_classifier_args(num_layers, num_heads, mlp_ratio, num_classes,
                                                     positional_embedding, dropout, attention_dropout,
                                                     stochastic_depth))


class _TextPatchModel(_TextModel):
    seq_pool: bool

    def __init__(self, seq_len=64, word_embedding_dim=300, embedding_dim=768, patch_size=2, vocab_size=100000,
                 padding_idx=1, num_layers=14, num_heads=6, mlp_ratio=4.0, num_classes=1000,
                 positional_embedding="sine", dropout=0.0, attention_dropout=0.1, stochastic_depth=0.1,
                 backend=None):
        if not isinstance(patch_size, int) or patch_size < 1 or seq_len % patch_size:
            raise ValueError(f"seq_len ({seq_len}) must be a multiple of patch_size ({patch_size!r})")
        tokenizer = TextTokenizer(patch_size, patch_size, 0, word_embedding_dim=word_embedding_dim,
                                  embedding_dim=embedding_dim, relu=False, max_pool=False)
        super().__init__(tokenizer, seq_len, word_embedding_dim, embedding_dim, self.seq_pool, vocab_size,
                         padding_idx, backend, **_classifier_args(num_layers, num_heads, mlp_ratio, num_classes,
                                                                  positional_embedding, dropout,
                                                                  attention_dropout, stochastic_depth))


class TextCVT(_TextPatchModel):
    """Text CVT: non-overlapping patches of words (no activation, no pool) -> masked encoder -> SeqPool."""

    seq_pool = True


class TextViTLite(_TextPatchModel):
    """Text ViT-Lite: non-overlapping patches of words -> class token -> masked encoder."""

    seq_pool = False


class TextTransformerLite(_TextModel):
    """A plain transformer over the word vectors (embedding_dim = word_embedding_dim), class token readout."""

    def __init__(self, seq_len=64, word_embedding_dim=300, vocab_size=100000, padding_idx=1, num_layers=14,
                 num_heads=6, mlp_ratio=4.0, num_classes=1000, positional_embedding="sine", dropout=0.0,
                 attention_dropout=0.1, stochastic_depth=0.1, backend=None):
        super().__init__(None, seq_len, word_embedding_dim, word_embedding_dim, False, vocab_size, padding_idx,
                         backend, **_classifier_args(num_layers, num_heads, mlp_ratio, num_classes,
                                                     positional_embedding, dropout, attention_dropout,
                                                     stochastic_depth))


# size -> (num_layers, num_heads, mlp_ratio); embedding_dim per family below (official factories).
_SIZES = {2: (2, 2, 1), 4: (4, 2, 1), 6: (6, 4, 2)}
_EMBEDDING_DIM = {
    "text_cct": {2: 128, 4: 128, 6: 256},
    "text_cvt": {2: 128, 4: 128, 6: 128},
    "text_vit": {2: 128, 4: 128, 6: 256},
}

TEXT_MODELS: dict[str, Callable[..., nn.Module]] = {}


def _text_cct(num_layers, num_heads, mlp_ratio, embedding_dim, kernel_size=4, stride=None, padding=None, **kwargs):
    stride = max(1, kernel_size // 2 - 1) if stride is None else stride
    padding = max(1, kernel_size // 2) if padding is None else padding
    return TextCCT(num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio, embedding_dim=embedding_dim,
                   kernel_size=kernel_size, stride=stride, padding=padding, **kwargs)


def _text_patch(cls):
    def build(num_layers, num_heads, mlp_ratio, embedding_dim, patch_size=4, **kwargs):
        return cls(num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio, embedding_dim=embedding_dim,
                   patch_size=patch_size, **kwargs)
    return build


_BUILDERS = {"text_cct": _text_cct, "text_cvt": _text_patch(TextCVT), "text_vit": _text_patch(TextViTLite)}


def _make_factory(family: str, size: int):
    name = f"{family}_{size}"
    num_layers, num_heads, mlp_ratio = _SIZES[size]

    if family == "text_transformer":
        def build(**kwargs):
            return TextTransformerLite(num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio, **kwargs)
        dims = "embedding_dim = word_embedding_dim (300)"
    else:
        embedding_dim = _EMBEDDING_DIM[family][size]

        def build(**kwargs):
            return _BUILDERS[family](num_layers, num_heads, mlp_ratio, embedding_dim, **kwargs)
        dims = f"embedding_dim {embedding_dim}"

    def factory(pretrained=False, progress=False, **kwargs):
        if pretrained is not False:
            raise ValueError(f"{name}: no official text checkpoints are published; build the model and load a "
                             f"state_dict with model.load_state_dict(torch.load(path))")
        return build(**kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"The official {name}: {num_layers} layers, {num_heads} heads, mlp ratio {mlp_ratio}, {dims}; "
                       f"keyword arguments (vocab_size, seq_len, num_classes, ...) go to the model class.")
    TEXT_MODELS[name] = MODELS[name] = factory


for _family in ("text_cct", "text_cvt", "text_vit", "text_transformer"):
    for _size in _SIZES:
        _make_factory(_family, _size)

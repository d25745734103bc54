"""CCT, CVT and ViT-Lite: the official constructors and state_dict, plus `backend=` and rectangular images.

Every constructor argument is checked at construction: a wrong type or value raises TypeError / ValueError
naming the argument, the value and what is allowed. num_classes=0 builds no head (the model returns the pooled
(B, embedding_dim) features, timm's convention).
"""
from __future__ import annotations

from torch import nn

from cct_kernels.nn import Tokenizer, TransformerClassifier, set_backend
from cct_kernels.nn._checks import check_image_size, check_int


def _check_model_arguments(img_size, embedding_dim) -> tuple[int, int]:
    """The checks that must come before the tokenizer is built (it would name embedding_dim differently)."""
    check_int("embedding_dim", embedding_dim, 1)
    return check_image_size(img_size)


class _TokenizerClassifier(nn.Module):
    """tokenizer -> classifier, with the sequence length computed from the tokenizer's arithmetic."""

    def __init__(self, tokenizer: Tokenizer, img_size, n_input_channels, backend, **classifier_args):
        super().__init__()
        self.img_size = check_image_size(img_size)
        self.n_input_channels = n_input_channels
        self.tokenizer = tokenizer
        rows, cols = tokenizer.output_grid(*self.img_size)
        if rows < 1 or cols < 1:
            raise ValueError(f"img_size {self.img_size} is too small for this tokenizer (token grid {rows}x{cols})")
        self.token_grid = (rows, cols)
        self.classifier = TransformerClassifier(sequence_length=rows * cols, **classifier_args)
        self.num_classes = self.classifier.num_classes  # 0: no head, forward returns (B, embedding_dim) features
        set_backend(self, backend)

    def set_backend(self, backend: str | None):
        """Use `backend` for every op of this model (None: follow use_backend / CCT_KERNELS_BACKEND / auto)."""
        return set_backend(self, backend)

    def forward(self, x):
        return self.classifier(self.tokenizer(x))


class CCT(_TokenizerClassifier):
    """Compact Convolutional Transformer: conv tokenizer (conv -> ReLU -> max pool per stage) + SeqPool."""

    def __init__(
        self, img_size=224, embedding_dim=768, n_input_channels=3, n_conv_layers=1, kernel_size=7, stride=2,
        padding=3, pooling_kernel_size=3, pooling_stride=2, pooling_padding=1, dropout=0.0, attention_dropout=0.1,
        stochastic_depth=0.1, num_layers=14, num_heads=6, mlp_ratio=4.0, num_classes=1000,
        positional_embedding="learnable", backend=None,
    ):
        _check_model_arguments(img_size, embedding_dim)
        tokenizer = Tokenizer(
            kernel_size, stride, padding, pooling_kernel_size, pooling_stride, pooling_padding, n_conv_layers,
            n_input_channels, embedding_dim, in_planes=64, activation=nn.ReLU, max_pool=True, conv_bias=False,
        )
        super().__init__(
            tokenizer, img_size, n_input_channels, backend, seq_pool=True, embedding_dim=embedding_dim,
            num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
            dropout=dropout, attention_dropout=attention_dropout, stochastic_depth=stochastic_depth,
            positional_embedding=positional_embedding,
        )


def _patch_tokenizer(kernel_size, n_input_channels, embedding_dim) -> Tokenizer:
    return Tokenizer(
        kernel_size, kernel_size, 0, n_conv_layers=1, n_input_channels=n_input_channels,
        n_output_channels=embedding_dim, activation=None, max_pool=False, conv_bias=True,
    )


class _PatchModel(_TokenizerClassifier):
    seq_pool: bool

    def __init__(
        self, img_size=224, embedding_dim=768, n_input_channels=3, kernel_size=16, dropout=0.0,
        attention_dropout=0.1, stochastic_depth=0.1, num_layers=14, num_heads=6, mlp_ratio=4.0, num_classes=1000,
        positional_embedding="learnable", backend=None,
    ):
        image = _check_model_arguments(img_size, embedding_dim)
        check_int("kernel_size", kernel_size, 1)
        if any(side % kernel_size for side in image):
            raise ValueError(f"img_size {image} must be a multiple of the patch size kernel_size={kernel_size}")
        super().__init__(
            _patch_tokenizer(kernel_size, n_input_channels, embedding_dim), img_size, n_input_channels, backend,
            seq_pool=self.seq_pool, embedding_dim=embedding_dim, num_layers=num_layers, num_heads=num_heads,
            mlp_ratio=mlp_ratio, num_classes=num_classes, dropout=dropout, attention_dropout=attention_dropout,
            stochastic_depth=stochastic_depth, positional_embedding=positional_embedding,
        )


class CVT(_PatchModel):
    """Compact Vision Transformer: non-overlapping patch embedding (conv with bias) + SeqPool."""

    seq_pool = True


class ViTLite(_PatchModel):
    """ViT-Lite: non-overlapping patch embedding (conv with bias) + class token."""

    seq_pool = False

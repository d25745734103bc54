"""Drop-in nn.Modules with the official parameter names; they hold parameters and call cct_kernels.ops."""
from cct_kernels.nn._backend import set_backend
from cct_kernels.nn.attention import Attention
from cct_kernels.nn.classifier import TransformerClassifier
from cct_kernels.nn.encoder import DropPath, TransformerEncoderLayer
from cct_kernels.nn.freeze import freeze, unfreeze
from cct_kernels.nn.positional import sinusoidal_embedding
from cct_kernels.nn.tokenizer import ConvStage, Tokenizer

__all__ = [
    "Attention", "ConvStage", "DropPath", "Tokenizer", "TransformerClassifier",
    "TransformerEncoderLayer", "freeze", "set_backend", "sinusoidal_embedding", "unfreeze",
]

"""The model zoo: CCT, CVT, ViTLite, the text models, their factories, and checkpoint loading."""
from cct_kernels.models.cct import CCT, CVT, ViTLite
from cct_kernels.models.checkpoint import load_checkpoint, resize_positional_embedding
from cct_kernels.models.convert import convert
from cct_kernels.models.factories import MODELS, create_model, list_models
from cct_kernels.models.text import TEXT_MODELS, TextCCT, TextCVT, TextTransformerLite, TextViTLite

globals().update(MODELS)

__all__ = ["CCT", "CVT", "MODELS", "TEXT_MODELS", "TextCCT", "TextCVT", "TextTransformerLite", "TextViTLite",
           "ViTLite", "convert", "create_model", "list_models", "load_checkpoint", "resize_positional_embedding",
           *MODELS]

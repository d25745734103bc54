"""The model zoo: CCT, CVT, ViTLite, their factories, and checkpoint loading."""
from cct_kernels.models.cct import CCT, CVT, ViTLite
from cct_kernels.models.checkpoint import load_checkpoint, resize_positional_embedding
from cct_kernels.models.convert import convert
from cct_kernels.models.factories import MODELS, create_model, list_models

globals().update(MODELS)

__all__ = ["CCT", "CVT", "MODELS", "ViTLite", "convert", "create_model", "list_models", "load_checkpoint",
           "resize_positional_embedding", *MODELS]

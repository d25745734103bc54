"""The functional ops: input checks, backend choice, and the torch.library registration of kernel backends."""
from cct_kernels.ops.attention import attention
from cct_kernels.ops.encoder_layer import encoder_layer, encoder_layers
from cct_kernels.ops.linear import linear
from cct_kernels.ops.seqpool import seqpool
from cct_kernels.ops.text_tokenize import text_tokenize
from cct_kernels.ops.tokenize import tokenize

__all__ = ["attention", "encoder_layer", "encoder_layers", "linear", "seqpool", "text_tokenize", "tokenize"]
